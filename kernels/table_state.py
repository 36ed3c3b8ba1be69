"""Checkpoint/export state of a lookup module, by table name, from its weights and momenta."""
from __future__ import annotations

import torch


class TableStateMixin:
    """For lookups that expose `tables`, `table_weights()` and `optimizer_states()` (views)."""

    def lookup_state(self) -> dict[str, torch.Tensor]:
        """Weights and optimizer state by table name (for checkpoints and export)."""
        state = {}
        for t, w, m in zip(self.tables, self.table_weights(), self.optimizer_states()):
            state[f"{t.name}.weight"] = w.detach().clone()
            state[f"{t.name}.momentum"] = m.detach().clone()
        return state

    def load_lookup_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for t, w, m in zip(self.tables, self.table_weights(), self.optimizer_states()):
                w.copy_(state[f"{t.name}.weight"])
                m.copy_(state[f"{t.name}.momentum"].view_as(m))
