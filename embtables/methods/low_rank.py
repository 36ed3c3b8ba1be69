"""low_rank: a feature's n×d table as a rank-r product E = A·B.

Factorized (trained end to end): A (n×r) is a physical table in the fused lookup, B (r×d) a
method parameter on the dense optimizer. r is the largest rank with r(n+d) floats within the
budget, or r + 1 when the rarest ids it makes share rows (id mod rows) carry ≤ 1% of the
accesses; where even r = 1 does not fit (ratios beyond d), A's rows are shared the same way.

Post-hoc (Yu et al., KDD'24): `from_trained` compresses a trained full table by
frequency-weighted PCA: μ = Σ p_i e_i, C = Σ p_i (e_i−μ)(e_i−μ)ᵀ, U_k its top-k eigenvectors;
A = (E−μ)U_k, B = U_kᵀ, and μ comes back through a second 1×d table that every id also hits.
That one row pools to L·μ (L = the bag's length, or its weight sum) inside the same fused
lookup, so combine stays linear in the pooled rows and remap keeps no per-batch state.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from embtables.methods.base import Method
from embtables.methods.budget import solve_within_budget
from embtables.specs import FP32_BYTES, FeatureSpec, TableSpec


class LowRank(Method):
    name = "low_rank"

    def __init__(self, feature: FeatureSpec, dim: int, rank: int, rows: int | None = None,
                 init_std: float = 0.01, with_mean: bool = False, basis: torch.Tensor | None = None,
                 info: dict | None = None):
        super().__init__([feature], dim)
        if not 1 <= rank <= dim:
            raise ValueError(f"low_rank {feature.name!r}: rank must be in [1, {dim}], got {rank}")
        self.rank = rank
        self.rows = feature.rows if rows is None else min(rows, feature.rows)
        self.init_std = init_std
        self.with_mean = with_mean
        self.info = dict(info or {})
        # B ~ N(0, 1/r): with A ~ N(0, init_std²) each coordinate of A·B has std init_std.
        self.basis = nn.Parameter(basis.clone().float() if basis is not None
                                  else torch.randn(rank, dim) / math.sqrt(rank))
        self._initial: dict[str, torch.Tensor] | None = None  # post-hoc rows for the lookup, not state

    @property
    def factor_name(self) -> str:
        return f"{self.features[0].name}/factor"

    @property
    def mean_name(self) -> str:
        return f"{self.features[0].name}/mean"

    def physical_tables(self) -> list[TableSpec]:
        tables = [TableSpec(self.factor_name, self.rows, self.rank, init_std=self.init_std)]
        if self.with_mean:
            tables.append(TableSpec(self.mean_name, 1, self.dim, init_std=self.init_std))
        return tables

    def remap(self, ids: KeyedJaggedTensor) -> KeyedJaggedTensor:
        values, lengths, weights = ids.values().long(), ids.lengths(), ids.weights_or_none()
        rows = values if self.rows == self.features[0].rows else torch.remainder(values, self.rows)
        if not self.with_mean:
            return KeyedJaggedTensor(keys=[self.factor_name], values=rows, lengths=lengths, weights=weights)
        # Every id also hits row 0 of the mean table, so its pooled output is L·μ.
        return KeyedJaggedTensor(keys=[self.factor_name, self.mean_name],
                                 values=torch.cat([rows, torch.zeros_like(values)]),
                                 lengths=torch.cat([lengths, lengths]),
                                 weights=None if weights is None else torch.cat([weights, weights]))

    def combine(self, pooled: dict[str, torch.Tensor]) -> torch.Tensor:
        out = pooled[self.factor_name] @ self.basis
        if self.with_mean:
            out = out + pooled[self.mean_name]
        return out.unsqueeze(1)

    def hyperparameters(self) -> dict:
        return {**self.info, "rank": self.rank, "rows": self.rows, "mean": self.with_mean}

    def initial_tables(self) -> dict[str, torch.Tensor]:
        """Post-hoc only: the rows to load into the fused lookup, by table name."""
        if self._initial is None:
            raise ValueError(f"low_rank {self.features[0].name!r} was not built by from_trained")
        return self._initial

    # --- factorized: solve the rank from the ratio ---------------------------------------
    @classmethod
    def solve(cls, feature: FeatureSpec, dim: int, ratio: float, **options) -> "LowRank":
        return solve_within_budget(cls.fit, [feature], dim, ratio, **options)[0]

    @classmethod
    def solve_group(cls, features: list[FeatureSpec], dim: int, ratio: float, **options) -> list["LowRank"]:
        """One budget for the group: a tiny feature's rank-1, one-row floor (d + 1 floats) can
        exceed its own share, so the large features pay for it (see `solve_within_budget`)."""
        return solve_within_budget(cls.fit, features, dim, ratio, **options)

    @classmethod
    def fit(cls, feature: FeatureSpec, dim: int, ratio: float, *, rank: int | None = None,
            max_shared_traffic: float = 0.01, mean: bool = False, init_std: float = 0.01) -> "LowRank":
        """r = the largest rank with r(n+d) floats ≤ full/ratio (at least 1). Integer ranks can
        leave much of the budget unused (r = 1 where 1.6 would fit), so r + 1 is taken when
        the ids it makes share rows (the rarest: rows are cut from the tail, id mod rows)
        carry at most `max_shared_traffic` of the accesses. `rank` fixes r instead; `mean` adds
        the post-hoc structure's 1×d mean row (how a compressed run is rebuilt from its config)."""
        n = feature.rows
        budget = n * dim / ratio - (dim if mean else 0)  # floats left for A and B

        def rows_at(r: int) -> int:
            return min(n, max(1, int((budget - r * dim) // r)))

        if rank is None:
            rank = min(dim, max(1, int(budget // (n + dim))))
            tail_mass = np.concatenate([np.cumsum(feature.probabilities()[::-1])[::-1], [0.0]])
            if rank + 1 < dim and tail_mass[rows_at(rank + 1)] <= max_shared_traffic:
                rank += 1
        rows = rows_at(rank)
        info = {"mode": "factorized", "budget_bytes": int(n * dim / ratio * FP32_BYTES),
                "shared_ids": n - rows}
        return cls(feature, dim, rank, rows=rows, init_std=init_std, with_mean=mean, info=info)

    # --- post-hoc: frequency-weighted PCA of a trained table ------------------------------
    @classmethod
    def from_trained(cls, feature: FeatureSpec, weight: torch.Tensor, rank: int | None = None,
                     ratio: float | None = None) -> "LowRank":
        """Rank from `rank`, or the largest whose tables + basis fit full/ratio (at least 1)."""
        n, d = weight.shape
        if n != feature.rows:
            raise ValueError(f"low_rank {feature.name!r}: weight has {n} rows, feature has {feature.rows}")
        if rank is None:
            if ratio is None:
                raise ValueError("from_trained needs rank or ratio")
            budget = n * d / ratio - d  # floats left after the mean row
            rank = min(d, max(1, int(budget // (n + d))))
        mean, basis, eigenvalues = weighted_pca(weight, feature.probabilities())
        u = basis[:, :rank]
        table = (weight.double() - mean) @ u
        info = {"mode": "post_hoc", "dropped_variance": float(eigenvalues[rank:].sum()),
                "total_variance": float(eigenvalues.sum())}
        method = cls(feature, d, rank, with_mean=True, basis=u.T.float(), info=info)
        method._initial = {method.factor_name: table.float(), method.mean_name: mean.float().unsqueeze(0)}
        return method


def weighted_pca(weight: torch.Tensor, probs: np.ndarray):
    """(μ, eigenvectors as columns by descending eigenvalue, eigenvalues) of Σ p_i (e_i−μ)(e_i−μ)ᵀ."""
    e = weight.detach().double().cpu()
    p = torch.as_tensor(probs, dtype=torch.float64)
    p = p / p.sum()
    mean = p @ e
    centred = e - mean
    cov = centred.T @ (centred * p.unsqueeze(1))
    eigenvalues, vectors = torch.linalg.eigh(cov)  # ascending
    order = torch.argsort(eigenvalues, descending=True)
    return mean, vectors[:, order], eigenvalues[order].clamp_min(0)
