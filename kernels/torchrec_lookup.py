"""TorchRec's EmbeddingBagCollection as a PooledLookup: the physical tables as ONE TorchRec EBC,
row-wise Adagrad fused into its backward.

Used wherever TorchRec holds our tables: the drop-in CompressedEmbeddingBagCollection and the
training job's sharded tables (pipelines/train/sharding.py builds it on the meta device).
Because it holds a plain TorchRec EBC (`ebc`), DistributedModelParallel finds and shards it with
TorchRec's own sharders and planner, and the optimizer registered by
`apply_optimizer_in_backward` becomes DMP's fused TBE optimizer (`model.fused_optimizer`). Its
state is TorchRec's (the EBC's state dict, the fused optimizer's; per-rank shards when sharded).

Odd dims: FBGEMM TBE (the kernel behind every sharded table) needs dims that are multiples of
4, and compressed methods produce any dim (mixed_dim blocks, low-rank factors, binary codes).
Such tables are padded to the next multiple of 4 inside the EBC and the pooled output is cut
back. The padded columns get zero gradient, so they never affect an output; row-wise Adagrad
averages g² over the padded row, which shrinks the accumulator by c = dim/padded, so lr and eps
are scaled by sqrt(c) and the update is exactly the unpadded one.

Always weighted: methods make per-sample weights in remap (multiplexed's mean combiner w/Σw,
qr's per-factor weighting), and an unweighted TorchRec EBC ignores a KJT's weights. A weighted
one requires them on every KJT, so calls without weights get ones (the same sums).
"""
from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

from embtables.errors import ConfigError
from embtables.kernels.optimizer import RowwiseAdagrad
from embtables.specs import TableSpec


def padded_dim(dim: int) -> int:
    return -(-dim // 4) * 4


def adagrad_scale(dim: int) -> float:
    """Factor on lr and eps that makes row-wise Adagrad on the padded row equal the unpadded one."""
    return math.sqrt(dim / padded_dim(dim))


def _init(spec: TableSpec, weight: torch.Tensor) -> None:
    """The table's own init, as TorchRec's init_fn: called on whole tables or on shards of any
    shape (padding columns included: they get no gradient, so their values never matter)."""
    with torch.no_grad():
        if spec.init_bound is not None:
            weight.uniform_(-spec.init_bound, spec.init_bound)
        else:
            weight.normal_(0.0, spec.init_std)


def table_configs(tables: list[TableSpec], keys: list[tuple[str, str]]) -> list[EmbeddingBagConfig]:
    """One TorchRec config per physical table (dim padded to 4); its feature names are the
    lookup keys that read it (several for a shared table, e.g. multiplexing)."""
    bad = [t.name for t in tables if "." in t.name]
    if bad:
        raise ConfigError(f"table names may not contain '.' in a TorchRec EmbeddingBagCollection: {bad}")
    return [EmbeddingBagConfig(name=t.name, embedding_dim=padded_dim(t.dim), num_embeddings=t.rows,
                               feature_names=[k for k, name in keys if name == t.name],
                               pooling=PoolingType.SUM, init_fn=partial(_init, t)) for t in tables]


def pooled_in_key_order(ebc: nn.Module, keys: list[str], key_dims: list[int], values: torch.Tensor,
                        offsets: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """One call of a weighted TorchRec EBC (training or quantized; its feature names are `keys`)
    on TBE-layout inputs → [B, Σ key dims] in key order, padding columns cut."""
    if weights is None:
        weights = torch.ones(values.numel(), device=values.device)
    pooled = ebc(KeyedJaggedTensor(keys=keys, values=values, offsets=offsets, weights=weights)).to_dict()
    return torch.cat([pooled[k][:, :d] for k, d in zip(keys, key_dims)], dim=1)


class TorchRecLookup(nn.Module):
    """A PooledLookup served by one TorchRec EBC: (values, offsets, weights) of the physical rows
    → [B, Σ key dims] in key order; `keys` are (lookup key, table name), as lookup_layout gives.

    device "meta": nothing is allocated; DistributedModelParallel allocates this rank's shards.
    optimizer: row-wise Adagrad fused into the backward of every table (None: plain parameters).
    """

    def __init__(self, tables: list[TableSpec], keys: list[tuple[str, str]], optimizer: RowwiseAdagrad | None,
                 device: torch.device | str | None = None):
        super().__init__()
        self.tables = list(tables)
        self.ebc = EmbeddingBagCollection(tables=table_configs(self.tables, keys), is_weighted=True,
                                          device=torch.device(device or "cpu"))
        dims = {t.name: t.dim for t in self.tables}
        self.key_names = [key for key, _ in keys]
        self.key_dims = [dims[t] for _, t in keys]  # pooled columns per lookup key
        if optimizer is not None:
            from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
            from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

            for t in self.tables:
                s = adagrad_scale(t.dim)
                apply_optimizer_in_backward(RowWiseAdagrad, [self.ebc.embedding_bags[t.name].weight],
                                            {"lr": optimizer.lr * s, "eps": optimizer.eps * s})

    @property
    def backends(self) -> list[str]:
        return ["torchrec"] * len(self.tables)

    @torch.no_grad()
    def load_weights(self, weights: list[torch.Tensor]) -> None:
        """Copy unpadded [rows, dim] weights (table order) into the unsharded EBC; padding stays zero."""
        for t, w in zip(self.tables, weights, strict=True):
            target = self.ebc.embedding_bags[t.name].weight
            target.zero_()
            target[:, :t.dim] = w

    def table_weights(self) -> list[torch.Tensor]:
        """The unsharded tables' real columns (views), in table order."""
        return [self.ebc.embedding_bags[t.name].weight[:, :t.dim] for t in self.tables]

    def forward(self, values: torch.Tensor, offsets: torch.Tensor,
                weights: torch.Tensor | None = None) -> torch.Tensor:
        return pooled_in_key_order(self.ebc, self.key_names, self.key_dims, values, offsets, weights)
