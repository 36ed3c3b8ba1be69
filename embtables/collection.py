"""The embedding layer: every method's remap → ONE fused lookup over all tables → combine."""
from __future__ import annotations

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from embtables.kernels import FusedLookup, RowwiseAdagrad
from embtables.methods.base import Method
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

    def forward(self, sparse: KeyedJaggedTensor) -> torch.Tensor:
        index = {k: i for i, k in enumerate(sparse.keys())}
        ordered = sparse.permute([index[n] for n in self._method_order])
        if self.fused_methods:
            out = self.lookup(ordered)  # raw ids in method order → [B, F, d]
        else:
            out = self._remap_lookup_combine(ordered)
        if self._output_order == sorted(self._output_order):  # already in feature order: no copy
            return out
        # index_select: its backward is a cheap index_add, advanced indexing's a slow scatter
        return out.index_select(1, torch.tensor(self._output_order, device=out.device))

    def _remap_lookup_combine(self, ordered: KeyedJaggedTensor) -> torch.Tensor:
        parts = ordered.split([len(m.features) for m in self.methods])
        physical = KeyedJaggedTensor.concat([m.remap(p) for m, p in zip(self.methods, parts)])
        if self.sharded:  # TorchRec EBC: DistributedModelParallel places tables and communicates
            pooled = self.lookup(physical)
        else:
            values = physical.values().long()
            offsets = physical.offsets().long()
            pooled_all = self.lookup(values, offsets, physical.weights_or_none())
            dims = {t.name: t.dim for t in self.tables}
            pooled = dict(zip((k for k, _ in self.keys), pooled_all.split([dims[t] for _, t in self.keys], 1)))
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

    def torchrec_configs(self):
        """The physical tables as TorchRec EmbeddingBagConfigs (one feature per table), for sharding."""
        from torchrec import EmbeddingBagConfig, PoolingType

        return [EmbeddingBagConfig(name=t.name, embedding_dim=t.dim, num_embeddings=t.rows,
                                   feature_names=[k for k, n in self.keys if n == t.name],
                                   pooling=PoolingType.SUM) for t in self.tables]
