"""The Triton embedding layer: raw ids → [B, F, d] with the methods' remap, the lookup and the
combine fused into one kernel (kernels/triton/lookup.py), which reads each method's fused parts.
The sibling of the pooled collection: same methods, tables, state names and accounting; only
the forward differs."""
from __future__ import annotations

import torch
from torchrec import KeyedJaggedTensor

from embtables.collection import EmbeddingLayer
from embtables.kernels import RowwiseAdagrad
from embtables.methods.base import Method
from embtables.specs import FeatureSpec, FusedFeature


def fused_parts(methods: list[Method], dim: int) -> list[FusedFeature]:
    """Every method's fused parts (features in method order); ValueError naming the first method
    that has none."""
    if any(m.dim != dim for m in methods):
        raise ValueError(f"the Triton lookup needs one output dim ({dim}) for every method")
    return [p for m in methods for p in m.fused_parts()]


class FusedMethodEmbeddings(EmbeddingLayer):
    def __init__(self, features: list[FeatureSpec], dim: int, methods: list[Method],
                 optimizer: RowwiseAdagrad | None = None, seed: int = 0, device: str | torch.device = "cpu"):
        from embtables.kernels.triton.lookup import TritonFusedLookup

        super().__init__(features, dim, methods)
        self.lookup = TritonFusedLookup(fused_parts(methods, dim), self.tables, dim, optimizer, seed, device)
        self.to(device)

    def forward(self, sparse: KeyedJaggedTensor) -> torch.Tensor:
        return self._in_feature_order(self.lookup(self._in_method_order(sparse)))  # raw ids in method order
