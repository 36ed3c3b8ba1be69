"""The embedding layer: every method's remap → ONE pooled lookup over all tables → combine.

`PooledEmbeddingCollection` is given its lookup (any `PooledLookup`: a fused kernel from
`make_lookup`, TorchRec's EBC sharded or in the drop-in, an export's quantized one) and never
asks which.
`FusedMethodEmbeddings` (Triton: remap, lookup and combine in one kernel) is its sibling;
both share the methods' bookkeeping through `EmbeddingLayer`. `build_embeddings` picks.
"""
from __future__ import annotations

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from embtables.errors import ConfigError
from embtables.jagged import kjt_offsets, order_keys
from embtables.kernels import RowwiseAdagrad, make_lookup, resolve_backend
from embtables.methods.base import Method, concat_remapped
from embtables.specs import FeatureSpec, TableSpec


def lookup_layout(methods: list[Method]) -> tuple[list[TableSpec], list[tuple[str, str]], list[int]]:
    """The methods' physical tables, lookup keys (key, table name) and the table each key reads."""
    tables = [t for m in methods for t in m.physical_tables()]
    names = [t.name for t in tables]
    if len(set(names)) != len(names):
        raise ValueError(f"physical table names collide: {names}")
    # One lookup key per pooled output; several keys may read one table (multiplexing).
    keys = [kt for m in methods for kt in m.lookups()]
    if len({k for k, _ in keys}) != len(keys):
        raise ValueError(f"lookup keys collide: {[k for k, _ in keys]}")
    return tables, keys, [names.index(t) for _, t in keys]


class EmbeddingLayer(nn.Module):
    """Raw-id KJT (one key per logical feature) → [B, F, d] in feature order: what every
    embedding layer shares (the methods, their tables and keys, their training hooks and bytes).
    dim None: each method has its own output dim (the TorchRec drop-in's tables may differ)."""

    def __init__(self, features: list[FeatureSpec], dim: int | None, methods: list[Method]):
        super().__init__()
        self.features = list(features)
        self.dim = dim
        self.methods = nn.ModuleList(methods)
        covered = [n for m in methods for n in m.feature_names]
        if sorted(covered) != sorted(f.name for f in features):
            raise ValueError(f"methods cover {covered}, features are {[f.name for f in features]}")
        if dim is not None and any(m.dim != dim for m in methods):
            raise ValueError(f"methods output dims {[m.dim for m in methods]}, the layer's dim is {dim}")
        self.tables, self.keys, self.key_tables = lookup_layout(methods)
        self._method_order = covered
        # Position of each logical feature in the methods' concatenated output.
        self._output_order = [covered.index(f.name) for f in features]
        self.register_buffer("_output_index", torch.tensor(self._output_order), persistent=False)
        # The same as columns of the flat [B, Σ feature dims] output.
        dims = [m.dim for m in methods for _ in m.features]
        starts = torch.tensor([0] + dims).cumsum(0).tolist()
        self._output_columns = [c for i in self._output_order for c in range(starts[i], starts[i] + dims[i])]
        self._reorders_columns = self._output_columns != sorted(self._output_columns)

    @property
    def input_keys(self) -> list[str]:
        """The feature order forward consumes; a KJT already in it (see `order_input`) is not permuted."""
        return self._method_order

    def order_input(self, sparse: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """The raw-id KJT in `input_keys` order, offsets filled in, without fbgemm ops: run it on the
        host before moving a batch to the device, and the device needs no permutation."""
        return order_keys(sparse, self._method_order)

    def _in_method_order(self, sparse: KeyedJaggedTensor) -> KeyedJaggedTensor:
        return sparse if sparse.keys() == self._method_order else self.order_input(sparse)

    def _in_feature_order(self, out: torch.Tensor) -> torch.Tensor:
        if self._output_order == sorted(self._output_order):  # already in feature order: no copy
            return out
        # index_select: its backward is a cheap index_add, advanced indexing's a slow scatter
        return out.index_select(1, self._output_index)

    # --- training hooks of the methods -----------------------------------------------------
    def regularization(self) -> torch.Tensor | None:
        """Sum of the methods' loss terms, or None when no method has one."""
        terms = [r for m in self.methods if (r := m.regularization()) is not None]
        return sum(terms[1:], terms[0]) if terms else None

    def param_groups(self) -> list[dict]:
        """Method parameters that need their own optimizer (see Method.param_groups)."""
        return [g for m in self.methods for g in m.param_groups()]

    # --- accounting ---------------------------------------------------------------------
    def embedding_bytes(self) -> int:
        return sum(m.embedding_bytes() for m in self.methods)

    def full_embedding_bytes(self) -> int:
        return sum(m.full_bytes() for m in self.methods)

    def describe(self) -> list[dict]:
        """Per method: features, tables and the hyperparameters its solve chose."""
        return [{"method": m.name, "features": m.feature_names,
                 "tables": [{"name": t.name, "rows": t.rows, "dim": t.dim} for t in m.physical_tables()],
                 "embedding_bytes": m.embedding_bytes(), "full_bytes": m.full_bytes(),
                 **({"hyperparameters": m.hyperparameters()} if m.hyperparameters() else {})}
                for m in self.methods]


class PooledEmbeddingCollection(EmbeddingLayer):
    """permute → each method's remap → lookup(values, offsets, weights) → each method's combine
    (or, when every combine only places columns, one column gather). `forward` gives [B, F, d],
    `flat` the same as [B, Σ feature dims] (which is all there is when the dims differ)."""

    def __init__(self, features: list[FeatureSpec], dim: int, methods: list[Method], lookup: nn.Module):
        super().__init__(features, dim, methods)
        self.lookup = lookup
        index = {t.name: t for t in self.tables}
        self._key_dims = [index[t].dim for _, t in self.keys]  # columns each key pools
        gather = self._gather_columns()
        self.register_buffer("_gather", gather, persistent=False)
        # Each pooled column lands once (a permutation): its gradient is the inverse gather.
        self.register_buffer("_scatter", None if gather is None else torch.argsort(gather), persistent=False)

    def _gather_columns(self) -> torch.Tensor | None:
        """When every method's combine only places columns: ONE gather from the lookup's output
        to [B, F·d] in feature order (combine and the feature reordering in one copy, instead
        of a split, a cat and a reorder each), else None."""
        starts, col = {}, 0
        for (key, _), dim in zip(self.keys, self._key_dims):
            starts[key], col = col, col + dim
        per_method = [m.combine_columns(starts) for m in self.methods]
        if any(c is None for c in per_method):
            return None
        columns = [c for cols in per_method for c in cols]  # features in method order
        if sorted(columns) != list(range(col)):
            return None  # not a permutation of the pooled columns
        return torch.tensor([columns[c] for c in self._output_columns])

    def forward(self, sparse: KeyedJaggedTensor) -> torch.Tensor:
        return self.flat(sparse).view(-1, len(self.features), self.dim)

    def flat(self, sparse: KeyedJaggedTensor) -> torch.Tensor:
        ordered = self._in_method_order(sparse)
        parts = ordered.split([len(m.features) for m in self.methods])
        physical = concat_remapped([m.remap(p) for m, p in zip(self.methods, parts)])
        pooled = self.lookup(physical.values().long(), kjt_offsets(physical), physical.weights_or_none())
        if self._gather is not None:
            return _PermuteColumns.apply(pooled, self._gather, self._scatter)
        by_key = dict(zip((k for k, _ in self.keys), pooled.split(self._key_dims, 1)))
        outs = [m.combine({k: by_key[k] for k, _ in m.lookups()}) for m in self.methods]
        if self.dim is not None:
            return self._in_feature_order(torch.cat(outs, dim=1)).flatten(1)
        out = torch.cat([o.flatten(1) for o in outs], dim=1)
        return out[:, self._output_columns] if self._reorders_columns else out


class _PermuteColumns(torch.autograd.Function):
    """x[:, order] whose backward is the inverse gather g[:, inverse], not a scatter-add."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(1, order)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(1, inverse), None, None


def build_embeddings(features: list[FeatureSpec], dim: int, methods: list[Method], backend: str = "auto",
                     device: str | torch.device = "cpu", optimizer: RowwiseAdagrad | None = None,
                     seed: int = 0) -> EmbeddingLayer:
    """The embedding layer for `embedding.backend` on `device`: the pooled collection over
    make_lookup's lookup, or, for Triton, the fused-method sibling."""
    from embtables.fused_embeddings import FusedMethodEmbeddings, fused_parts

    try:
        fused_parts(methods, dim)
        unfusable = None
    except ValueError as e:
        unfusable = str(e)
    if backend == "triton" and unfusable:
        raise ConfigError(f"embedding.backend 'triton': {unfusable}")
    kind = resolve_backend(backend, device, triton_ok=unfusable is None)
    if kind == "triton":
        return FusedMethodEmbeddings(features, dim, methods, optimizer, seed, device)
    tables, _, key_tables = lookup_layout(methods)
    lookup = make_lookup(tables, key_tables, kind, device, optimizer, seed)
    return PooledEmbeddingCollection(features, dim, methods, lookup).to(device)
