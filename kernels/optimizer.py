"""The sparse optimizer every lookup backend fuses into its backward pass."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowwiseAdagrad:
    """Row-wise Adagrad (FBGEMM's EXACT_ROWWISE_ADAGRAD): one accumulator per row.

    state[r] += mean(g[r]²);  w[r] -= lr · g[r] / (sqrt(state[r]) + eps)
    Duplicate rows in a batch are summed before the update (exact, not per occurrence).
    """

    lr: float = 0.05
    eps: float = 1e-8

    def apply_(self, weight: torch.Tensor, state: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor) -> None:
        """Update `weight[rows]` and `state[rows]` in place; `rows` must be unique."""
        if rows.numel() == 0:
            return
        grad = grad.to(weight.dtype)
        new_state = state[rows] + grad.pow(2).mean(dim=1)
        state[rows] = new_state
        weight[rows] -= (self.lr / (new_state.sqrt() + self.eps)).unsqueeze(1) * grad


def initial_weights(tables, initial: list[torch.Tensor] | None) -> list[torch.Tensor]:
    """The given starting weights, or each table's own init (so backends agree row for row)."""
    if initial is None:
        return [t.init_weight() for t in tables]
    for t, w in zip(tables, initial, strict=True):
        if tuple(w.shape) != (t.rows, t.dim):
            raise ValueError(f"table {t.name!r}: initial weight {tuple(w.shape)} != {(t.rows, t.dim)}")
    return initial
