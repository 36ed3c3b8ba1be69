"""full: one uncompressed n×d table per feature — the honest reference."""
from __future__ import annotations

import torch
from torchrec import KeyedJaggedTensor

from embtables.methods.base import Method
from embtables.specs import IDENTITY, FeatureSpec, FusedFeature, FusedPart, TableSpec


class Full(Method):
    name = "full"

    def __init__(self, feature: FeatureSpec, dim: int, init_std: float = 0.01):
        super().__init__([feature], dim)
        self.init_std = init_std

    @property
    def table_name(self) -> str:
        return f"{self.features[0].name}/full"

    def physical_tables(self) -> list[TableSpec]:
        return [TableSpec(self.table_name, self.features[0].rows, self.dim, init_std=self.init_std)]

    def remap(self, ids: KeyedJaggedTensor) -> KeyedJaggedTensor:
        return KeyedJaggedTensor(keys=[self.table_name], values=ids.values(), lengths=ids.lengths(),
                                 weights=ids.weights_or_none())

    def combine(self, pooled: dict[str, torch.Tensor]) -> torch.Tensor:
        return pooled[self.table_name].unsqueeze(1)

    def combine_columns(self, starts: dict[str, int]) -> list[int]:
        return list(range(starts[self.table_name], starts[self.table_name] + self.dim))

    def fused_parts(self) -> list[FusedFeature]:
        return [FusedFeature((FusedPart(IDENTITY, self.table_name),))]

    @classmethod
    def solve(cls, feature: FeatureSpec, dim: int, ratio: float = 1.0, init_std: float = 0.01) -> "Full":
        return cls(feature, dim, init_std=init_std)
