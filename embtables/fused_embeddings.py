"""The Triton embedding layer: raw ids → [B, F, d] with the methods' remap, the lookup and the
combine fused into one kernel (kernels/triton_lookup.py). The sibling of the pooled collection:
same methods, tables, state names and accounting; only the forward differs."""
from __future__ import annotations

import torch
from torchrec import KeyedJaggedTensor

from embtables.collection import EmbeddingLayer
from embtables.kernels import RowwiseAdagrad
from embtables.methods.base import Method
from embtables.specs import FeatureSpec


def fusable(methods: list[Method]) -> bool:
    """Every method can run inside the Triton kernel."""
    from embtables.kernels.triton_lookup import triton_supports

    return triton_supports(methods)


class FusedMethodEmbeddings(EmbeddingLayer):
    def __init__(self, features: list[FeatureSpec], dim: int, methods: list[Method],
                 optimizer: RowwiseAdagrad | None = None, seed: int = 0, device: str | torch.device = "cpu"):
        from embtables.kernels.triton_lookup import TritonMethodLookup

        super().__init__(features, dim, methods)
        self.lookup = TritonMethodLookup(methods, optimizer, seed=seed, device=device)
        self.to(device)

    def forward(self, sparse: KeyedJaggedTensor) -> torch.Tensor:
        return self._in_feature_order(self.lookup(self._in_method_order(sparse)))  # raw ids in method order
