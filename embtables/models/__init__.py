"""CTR models on top of the embedding collection."""
from __future__ import annotations

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from embtables.collection import EmbeddingLayer
from embtables.models.dcnv2 import DCNv2
from embtables.models.dlrm import DLRM


LOOKUP_PREFIX = "embeddings.lookup."  # state-dict keys of the tables (CTRModel.embeddings.lookup)


class CTRModel(nn.Module):
    """Embedding collection + dense network → click logit."""

    def __init__(self, embeddings: EmbeddingLayer, network: nn.Module):
        super().__init__()
        self.embeddings = embeddings
        self.network = network

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        return self.network(dense, self.embeddings(sparse))

    @property
    def device(self) -> torch.device:
        """Where the model lives (the dense network's parameters; the tables are placed with them)."""
        return next(self.network.parameters()).device

    def dense_parameters(self):
        """Everything but the tables (those are updated inside the fused lookup's backward)."""
        lookup = {id(p) for p in self.embeddings.lookup.parameters()}
        return [p for p in self.parameters() if id(p) not in lookup]


def build_network(cfg_model: dict, n_dense: int, n_sparse: int, dim: int) -> nn.Module:
    if cfg_model["name"] == "dlrm":
        return DLRM(n_dense, n_sparse, dim, cfg_model["bottom_mlp"], cfg_model["top_mlp"], cfg_model["dropout"])
    return DCNv2(n_dense, n_sparse, dim, cfg_model["cross_layers"], cfg_model["deep_mlp"], cfg_model["dropout"])
