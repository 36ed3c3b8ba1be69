"""FrequencyOrder: raw ids → ids whose most frequent come first, as frequency-aware methods expect.

Our methods assume id 0 is the most frequent (the data pipeline's vocabulary assigns ids so);
TorchRec users bring raw ids. Given per-id counts, the K most frequent ids are stored sorted
(with their rank) and move to [0, K) in frequency order; every other id keeps its relative
order behind them: new = K + id − #(hot ids below id). A bijection on [0, n) that costs 8
bytes per hot id (counted in embedding_bytes), not a full n-entry permutation. K is what fits
in a tenth of the table's budget (the method gets the rest).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

SHARE = 0.1  # of a table's byte budget spent on the hot ids
HOT_ID_BYTES = 8  # int32 id + int32 rank


def count_ids(values: torch.Tensor, rows: int) -> np.ndarray:
    """How often each id in [0, rows) occurs in `values`."""
    return np.bincount(values.long().cpu().numpy(), minlength=rows)[:rows].astype(np.float64)


class FrequencyOrder(nn.Module):
    def __init__(self, hot: np.ndarray, rows: int):
        super().__init__()
        self.rows = rows
        dtype = torch.int32 if rows < 2**31 else torch.int64
        order = np.argsort(hot, kind="stable")
        self.register_buffer("hot_ids", torch.as_tensor(hot[order], dtype=dtype))  # ascending
        self.register_buffer("hot_rank", torch.as_tensor(order, dtype=dtype))  # their frequency rank

    @classmethod
    def fit(cls, counts: np.ndarray, dim: int, ratio: float) -> tuple["FrequencyOrder | None", float]:
        """(order, ratio the method must then meet); (None, ratio) when ids are already in
        frequency order or no hot id fits the budget."""
        counts = np.asarray(counts, dtype=np.float64)
        rows = len(counts)
        if np.all(np.diff(counts) <= 0):
            return None, ratio
        budget = rows * dim * 4 / ratio
        k = min(int((counts > 0).sum()), int(SHARE * budget // HOT_ID_BYTES))
        if k < 1:
            return None, ratio
        hot = np.argsort(-counts, kind="stable")[:k]
        return cls(hot, rows), rows * dim * 4 / (budget - k * HOT_ID_BYTES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hot = self.hot_ids.to(ids.dtype)
        below = torch.searchsorted(hot, ids)  # hot ids < id
        at = below.clamp(max=hot.numel() - 1)
        return torch.where(hot[at] == ids, self.hot_rank[at].to(ids.dtype), hot.numel() + ids - below)

    def reorder(self, counts: np.ndarray) -> np.ndarray:
        """counts indexed by the new ids."""
        out = np.empty_like(np.asarray(counts, dtype=np.float64))
        out[self(torch.arange(self.rows)).numpy()] = counts
        return out
