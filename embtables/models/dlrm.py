"""DLRM (Naumov et al. 2019): bottom MLP on dense features, pairwise dot interaction, top MLP."""
from __future__ import annotations

import torch
from torch import nn

from embtables.kernels.interaction import pair_index, pairwise_dots
from embtables.models.layers import mlp


class DLRM(nn.Module):
    def __init__(self, n_dense: int, n_sparse: int, dim: int, bottom_mlp: list[int], top_mlp: list[int],
                 dropout: float = 0.0):
        super().__init__()
        # The bottom MLP maps dense features into the embedding space so they join the interaction.
        self.bottom = mlp([n_dense, *bottom_mlp, dim]) if n_dense > 0 else None
        n_vectors = n_sparse + (1 if self.bottom is not None else 0)
        self.n_pairs = n_vectors * (n_vectors - 1) // 2
        rows, cols = torch.triu_indices(n_vectors, n_vectors, offset=1)
        self.register_buffer("pair_rows", rows, persistent=False)
        self.register_buffer("pair_cols", cols, persistent=False)
        self.register_buffer("pair_flat", pair_index(n_vectors), persistent=False)
        top_in = self.n_pairs + (dim if self.bottom is not None else 0)
        self.top = nn.Sequential(mlp([top_in, *top_mlp], dropout), nn.Linear(top_mlp[-1] if top_mlp else top_in, 1))

    def forward(self, dense: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        """dense [B, n_dense], embedded [B, F, d] → logits [B]."""
        if self.bottom is not None:
            x = self.bottom(dense)
            vectors = torch.cat([x.unsqueeze(1), embedded], dim=1)
        else:
            x, vectors = None, embedded
        dots = pairwise_dots(vectors, self.pair_flat)  # = bmm(V, Vᵀ)[:, pair_rows, pair_cols], faster backward
        top_in = dots if x is None else torch.cat([x, dots], dim=1)
        return self.top(top_in).squeeze(1)
