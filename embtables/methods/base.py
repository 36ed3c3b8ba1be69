"""The method contract: remap ids → one shared fused lookup → combine.

A method never owns an embedding table. It declares plain tables (`physical_tables`), turns
raw ids into rows of those tables (`remap`, index arithmetic only) and turns the pooled rows
into one d-dim vector per feature (`combine`, small dense parameters only). The collection
runs every method's tables through one fused, shardable lookup.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from embtables.specs import FeatureSpec, TableSpec


class Method(nn.Module):
    """One compression method for one feature (or a group of features, e.g. multiplexing)."""

    name: ClassVar[str]

    def __init__(self, features: list[FeatureSpec], dim: int):
        super().__init__()
        self.features = list(features)
        self.dim = dim

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    # --- the contract -------------------------------------------------------------------
    def physical_tables(self) -> list[TableSpec]:
        raise NotImplementedError

    def remap(self, ids: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """Raw ids (keys = this method's features) → rows (keys = its physical table names)."""
        raise NotImplementedError

    def combine(self, pooled: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pooled rows per physical table ([B, table dim]) → [B, len(features), dim]."""
        raise NotImplementedError

    @classmethod
    def solve(cls, feature: FeatureSpec, dim: int, ratio: float, **options) -> "Method":
        """The method's hyperparameters chosen so that embedding_bytes ≤ full_bytes / ratio."""
        raise NotImplementedError

    @classmethod
    def solve_group(cls, features: list[FeatureSpec], dim: int, ratio: float, **options) -> list["Method"]:
        """Methods for all features given this method; per-feature by default."""
        return [cls.solve(f, dim, ratio, **options) for f in features]

    def hyperparameters(self) -> dict:
        """What `solve` chose, for metrics.json and the export manifest."""
        return {}

    def export(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The method's own tensors (tables excluded: the collection exports those) + manifest entry."""
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        manifest = {"method": self.name, "features": self.feature_names, "dim": self.dim,
                    "tables": [t.name for t in self.physical_tables()],
                    "hyperparameters": self.hyperparameters()}
        return tensors, manifest

    # --- accounting ---------------------------------------------------------------------
    def embedding_bytes(self) -> int:
        """Every tensor needed at inference: tables plus the method's params and buffers."""
        own = sum(t.numel() * t.element_size() for t in self.state_dict().values())
        return sum(t.bytes for t in self.physical_tables()) + own

    def full_bytes(self) -> int:
        return sum(f.full_bytes(self.dim) for f in self.features)


def single_feature_kjt(key: str, ids: KeyedJaggedTensor, values: torch.Tensor,
                       lengths: torch.Tensor | None = None) -> KeyedJaggedTensor:
    """A KJT for one physical table sharing the bags of `ids` (one feature) unless lengths differ."""
    return KeyedJaggedTensor(keys=[key], values=values,
                             lengths=ids.lengths() if lengths is None else lengths,
                             weights=ids.weights_or_none())
