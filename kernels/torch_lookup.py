"""Pure-torch reference backend: one `embedding_bag` per table, optimizer applied in backward.

This is the definition every other backend is tested against, and the fallback wherever
FBGEMM does not import or a table's shape does not suit it (dims not a multiple of 4).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from embtables.kernels.optimizer import RowwiseAdagrad, initial_weights
from embtables.specs import TableSpec


class TorchLookup(nn.Module):
    """Pooled (sum) lookup over many tables, with row-wise Adagrad fused into backward.

    Inputs follow FBGEMM's TBE layout: `indices` flat, `offsets` of length G·B + 1 in
    group-major order (all bags of group 0, then group 1, …); group g reads table
    `feature_tables[g]` (default: table g). Output: [B, Σ group dims].
    """

    backend = "torch"

    def __init__(self, tables: list[TableSpec], optimizer: RowwiseAdagrad | None = None,
                 initial: list[torch.Tensor] | None = None, feature_tables: list[int] | None = None,
                 device: str | torch.device = "cpu"):
        super().__init__()
        self.tables = list(tables)
        self.feature_tables = list(range(len(tables))) if feature_tables is None else list(feature_tables)
        self.optimizer = optimizer or RowwiseAdagrad()
        self.weights = nn.ParameterList(nn.Parameter(w.to(device, copy=True))
                                        for w in initial_weights(self.tables, initial))
        for i, t in enumerate(self.tables):
            self.register_buffer(f"momentum_{i}", torch.zeros(t.rows, device=device))
            # Apply the update as soon as this table's gradient is complete, then drop the
            # gradient: no dense [rows, dim] gradient survives the step.
            self.weights[i].register_post_accumulate_grad_hook(self._make_hook(i))

    def _make_hook(self, i: int):
        def hook(param: torch.Tensor) -> None:
            grad = param.grad
            param.grad = None
            if grad is None or not self.training:
                return
            grad = grad.coalesce()
            rows = grad.indices()[0]
            with torch.no_grad():
                self.optimizer.apply_(param.data, self.momentum(i), rows, grad.values())
        return hook

    def momentum(self, i: int) -> torch.Tensor:
        return getattr(self, f"momentum_{i}")

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        batch = (offsets.numel() - 1) // len(self.feature_tables)
        # Every group's first offset in one device→host copy (one sync on CUDA, not two per group).
        bounds = offsets[::batch].tolist() if batch else [0] * (len(self.feature_tables) + 1)
        outs = []
        for i, table in enumerate(self.feature_tables):
            weight = self.weights[table]  # a table read by several groups gets their grads summed
            start, end = i * batch, (i + 1) * batch
            bag_offsets = offsets[start:end + 1]
            lo, hi = bounds[i], bounds[i + 1]
            psw = None if per_sample_weights is None else per_sample_weights[lo:hi]
            outs.append(F.embedding_bag(indices[lo:hi], weight, bag_offsets[:-1] - lo, mode="sum",
                                        sparse=True, per_sample_weights=psw, include_last_offset=False))
        return torch.cat(outs, dim=1)

    def table_weights(self) -> list[torch.Tensor]:
        return [w.data for w in self.weights]

    def optimizer_states(self) -> list[torch.Tensor]:
        return [self.momentum(i) for i in range(len(self.tables))]
