"""The embedding layer: every method's remap → ONE fused lookup over all tables → combine."""
from __future__ import annotations

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from embtables.kernels import FusedLookup, RowwiseAdagrad
from embtables.methods.base import Method, concat_remapped
from embtables.specs import FeatureSpec, TableSpec


class EmbeddingCollection(nn.Module):
    """Raw-id KJT (one key per logical feature) → [B, F, d] in feature order."""

    def __init__(self, features: list[FeatureSpec], dim: int, methods: list[Method],
                 backend: str = "auto", optimizer: RowwiseAdagrad | None = None, seed: int = 0):
        super().__init__()
        self.features = list(features)
        self.dim = dim
        self.methods = nn.ModuleList(methods)
        covered = [n for m in methods for n in m.feature_names]
        if sorted(covered) != sorted(f.name for f in features):
            raise ValueError(f"methods cover {covered}, features are {[f.name for f in features]}")
        self.tables: list[TableSpec] = [t for m in methods for t in m.physical_tables()]
        names = [t.name for t in self.tables]
        if len(set(names)) != len(names):
            raise ValueError(f"physical table names collide: {names}")
        # One lookup key per pooled output; several keys may read one table (multiplexing).
        self.keys: list[tuple[str, str]] = [kt for m in methods for kt in m.lookups()]
        if len({k for k, _ in self.keys}) != len(self.keys):
            raise ValueError(f"lookup keys collide: {[k for k, _ in self.keys]}")
        index = {n: i for i, n in enumerate(names)}
        self._key_dims = [self.tables[index[t]].dim for _, t in self.keys]  # columns each key pools
        # backend "sharded": no local tables; pipelines.sharding attaches a TorchRec lookup later.
        self.sharded = backend == "sharded"
        # backend "triton" (GPU, opt-in): remap + lookup + combine of every method in one kernel.
        self.fused_methods = backend == "triton"
        if self.fused_methods:
            from embtables.kernels.triton_lookup import TritonMethodLookup

            self.lookup = TritonMethodLookup(methods, optimizer, seed=seed)
        else:
            self.lookup = None if self.sharded else FusedLookup(self.tables, backend=backend, optimizer=optimizer,
                                                                 seed=seed,
                                                                 feature_tables=[index[t] for _, t in self.keys])
        self._method_order = covered
        # Position of each logical feature in the methods' concatenated output.
        self._output_order = [covered.index(f.name) for f in features]
        self.register_buffer("_output_index", torch.tensor(self._output_order), persistent=False)
        gather = self._gather_columns()
        self.register_buffer("_gather", gather, persistent=False)
        # Each pooled column lands once (a permutation): its gradient is the inverse gather.
        self.register_buffer("_scatter", None if gather is None else torch.argsort(gather), persistent=False)

    def _gather_columns(self) -> torch.Tensor | None:
        """When every method's combine only places columns: ONE gather from the lookup's output
        to [B, F·d] in feature order (combine and the feature reordering in one copy, instead
        of a split, a cat and a reorder each), else None."""
        if self.sharded or self.fused_methods:
            return None
        starts, col = {}, 0
        for (key, _), dim in zip(self.keys, self._key_dims):
            starts[key], col = col, col + dim
        per_method = [m.combine_columns(starts) for m in self.methods]
        if any(c is None for c in per_method):
            return None
        columns = [c for cols in per_method for c in cols]  # features in method order
        if sorted(columns) != list(range(col)):
            return None  # not a permutation of the pooled columns
        d = self.dim
        return torch.tensor([c for i in self._output_order for c in columns[i * d:(i + 1) * d]])

    def forward(self, sparse: KeyedJaggedTensor) -> torch.Tensor:
        index = {k: i for i, k in enumerate(sparse.keys())}
        ordered = sparse.permute([index[n] for n in self._method_order])
        if self.fused_methods:
            out = self.lookup(ordered)  # raw ids in method order → [B, F, d]
        elif self._gather is not None:
            out = _PermuteColumns.apply(self._pooled(ordered), self._gather, self._scatter)
            return out.view(-1, len(self.features), self.dim)
        else:
            out = self._remap_lookup_combine(ordered)
        if self._output_order == sorted(self._output_order):  # already in feature order: no copy
            return out
        # index_select: its backward is a cheap index_add, advanced indexing's a slow scatter
        return out.index_select(1, self._output_index)

    def _physical(self, ordered: KeyedJaggedTensor) -> KeyedJaggedTensor:
        parts = ordered.split([len(m.features) for m in self.methods])
        return concat_remapped([m.remap(p) for m, p in zip(self.methods, parts)])

    def _pooled(self, ordered: KeyedJaggedTensor) -> torch.Tensor:
        """[B, Σ key dims]: every lookup key's pooled rows, keys in order, from the fused lookup."""
        physical = self._physical(ordered)
        return self.lookup(physical.values().long(), physical.offsets().long(), physical.weights_or_none())

    def _remap_lookup_combine(self, ordered: KeyedJaggedTensor) -> torch.Tensor:
        if self.sharded:  # TorchRec EBC: DistributedModelParallel places tables and communicates
            pooled = self.lookup(self._physical(ordered))
        else:
            splits = self._pooled(ordered).split(self._key_dims, 1)
            pooled = dict(zip((k for k, _ in self.keys), splits))
        return torch.cat([m.combine({k: pooled[k] for k, _ in m.lookups()}) for m in self.methods], dim=1)

    def use_sharded_lookup(self, lookup: nn.Module) -> None:
        """Serve the tables from `lookup(physical KJT) -> {table name: [B, dim]}` instead of the
        FusedLookup (a TorchRec EmbeddingBagCollection, sharded by DistributedModelParallel)."""
        self.lookup = lookup
        self.sharded = True

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
        return sum(f.full_bytes(self.dim) for f in self.features)

    def describe(self) -> dict:
        """Per method: features, tables and the hyperparameters its solve chose."""
        return [{"method": m.name, "features": m.feature_names,
                 "tables": [{"name": t.name, "rows": t.rows, "dim": t.dim} for t in m.physical_tables()],
                 "embedding_bytes": m.embedding_bytes(), "full_bytes": m.full_bytes(),
                 **({"hyperparameters": m.hyperparameters()} if m.hyperparameters() else {})}
                for m in self.methods]


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
