"""hash: the hashing trick, row = h_salt(id) mod m — the baseline every method must beat."""
from __future__ import annotations

import math

import torch
from torchrec import KeyedJaggedTensor

from embtables.methods.base import Method, single_feature_kjt
from embtables.methods.budget import solve_within_budget
from embtables.hashing import hashed_rows, mixed_salt, salt_of
from embtables.specs import HASH, FeatureSpec, FusedFeature, FusedPart, TableSpec


class Hash(Method):
    name = "hash"

    def __init__(self, feature: FeatureSpec, dim: int, rows: int, init_std: float = 0.01):
        super().__init__([feature], dim)
        self.rows = int(rows)
        self.init_std = init_std
        self.salt = salt_of(feature.name)  # from the name: the same rows on every run and machine

    @property
    def table_name(self) -> str:
        return f"{self.features[0].name}/hash"

    def physical_tables(self) -> list[TableSpec]:
        return [TableSpec(self.table_name, self.rows, self.dim, init_std=self.init_std)]

    def remap(self, ids: KeyedJaggedTensor) -> KeyedJaggedTensor:
        return single_feature_kjt(self.table_name, ids, hashed_rows(ids.values(), self.salt, self.rows))

    def combine(self, pooled: dict[str, torch.Tensor]) -> torch.Tensor:
        return pooled[self.table_name].unsqueeze(1)

    def combine_columns(self, starts: dict[str, int]) -> list[int]:
        return list(range(starts[self.table_name], starts[self.table_name] + self.dim))

    def fused_parts(self) -> list[FusedFeature]:
        return [FusedFeature((FusedPart(HASH, self.table_name, a=mixed_salt(self.salt), b=self.rows),))]

    def hyperparameters(self) -> dict:
        return {"rows": self.rows, "salt": self.salt,
                "achieved_ratio": round(self.full_bytes() / self.embedding_bytes(), 3)}

    @classmethod
    def fit(cls, feature: FeatureSpec, dim: int, ratio: float, init_std: float = 0.01) -> "Hash":
        """m = ⌊n / ratio⌋ rows (bytes ≤ full / ratio), at least one."""
        rows = max(1, min(feature.rows, math.floor(feature.rows / ratio)))
        return cls(feature, dim, rows, init_std=init_std)

    @classmethod
    def solve(cls, feature: FeatureSpec, dim: int, ratio: float, init_std: float = 0.01) -> "Hash":
        return solve_within_budget(cls.fit, [feature], dim, ratio, init_std=init_std)[0]

    @classmethod
    def solve_group(cls, features: list[FeatureSpec], dim: int, ratio: float,
                    init_std: float = 0.01) -> list["Hash"]:
        return solve_within_budget(cls.fit, features, dim, ratio, init_std=init_std)
