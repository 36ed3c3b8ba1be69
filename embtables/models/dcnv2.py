"""DCNv2 (Wang et al. 2021): full-rank cross layers, then a deep MLP (stacked structure)."""
from __future__ import annotations

import torch
from torch import nn

from embtables.models.layers import mlp


class CrossLayer(nn.Module):
    """x_{l+1} = x_0 ⊙ (W x_l + b) + x_l."""

    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.linear(x) + x


class DCNv2(nn.Module):
    def __init__(self, n_dense: int, n_sparse: int, dim: int, cross_layers: int, deep_mlp: list[int],
                 dropout: float = 0.0):
        super().__init__()
        width = n_dense + n_sparse * dim
        self.cross = nn.ModuleList(CrossLayer(width) for _ in range(cross_layers))
        self.deep = mlp([width, *deep_mlp], dropout)
        self.head = nn.Linear(deep_mlp[-1] if deep_mlp else width, 1)

    def forward(self, dense: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        x0 = torch.cat([dense, embedded.flatten(1)], dim=1)
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        return self.head(self.deep(x)).squeeze(1)
