"""CompressedEmbeddingBagCollection: TorchRec's EmbeddingBagCollection interface over compressed tables.

    ebc = CompressedEmbeddingBagCollection(tables=[EmbeddingBagConfig(...), ...],
                                           compression={"method": "hash", "ratio": 10})
    ebc(kjt) -> KeyedTensor  # keyed by feature name, in TorchRec's order

Each logical table (an EmbeddingBagConfig) is one FeatureSpec that a compression method solves;
each of its feature names reads it. forward = the methods' remap (raw ids in [0, num_embeddings)
→ physical rows) → ONE inner TorchRec EmbeddingBagCollection over the physical tables → the
methods' combine. Since the inner module is a plain TorchRec EBC, DistributedModelParallel
shards it with TorchRec's own sharders and planner; build with device="meta" for DMP, as for
a TorchRec EBC. Row-wise Adagrad is fused into its backward (`apply_optimizer_in_backward`), so
under DMP its state is in `model.fused_optimizer`; unsharded, `fused_optimizer()` gives the
per-table optimizers and a dense optimizer should take `in_backward_optimizer_filter(...)`.

Frequency-aware methods (mixed_dim blocks, frequency-aware qr) need per-id counts (`counts`, or
a `sample` KJT to count): the most frequent ids are moved to the front (FrequencyOrder, whose
bytes count in the budget). Without counts they take their frequency-agnostic form (mixed_dim
per-table dims, plain qr), warn, and say so in `describe()`.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor, PoolingType

from embtables.frequency_order import FrequencyOrder, count_ids
from embtables.kernels.lookup import seeded_initial_weights
from embtables.kernels.optimizer import RowwiseAdagrad
from embtables.methods.base import Method, concat_remapped
from embtables.methods.build import build_methods
from embtables.specs import FeatureSpec
from embtables.torchrec_tables import TorchRecTables

# Options that make a frequency-aware method frequency-agnostic, used when a table has no counts.
AGNOSTIC = {"mixed_dim": {"mode": "feature"}, "qr": {"frequency_aware": False}}


class CompressedEmbeddingBagCollection(nn.Module):
    """KJT of raw ids (keys = the tables' feature names) → KeyedTensor of pooled embeddings.

    compression: {"method": ..., "ratio": ..., **options} for every table, or {table name: that
    mapping} per table (tables left out stay full). counts: {table or feature name: per-id counts
    [num_embeddings]}; sample: a KJT whose ids are counted instead. optimizer: the fused row-wise
    Adagrad of the tables (None: plain parameters, trained by whatever optimizer the user chooses).
    """

    def __init__(self, tables: list[EmbeddingBagConfig], compression: dict | None = None,
                 device: torch.device | str | None = None, is_weighted: bool = False,
                 optimizer: RowwiseAdagrad | None = RowwiseAdagrad(), counts: dict | None = None,
                 sample: KeyedJaggedTensor | None = None, seed: int = 0):
        super().__init__()
        self._configs = list(tables)
        self._is_weighted = is_weighted
        self._check_tables()
        self.feature_names = [f for t in self._configs for f in t.feature_names]
        counts = _table_counts(self._configs, counts, sample)
        specs = _table_specs(self._configs, compression or {"method": "full"})
        self.frequency: dict[str, str] = {}
        self.orders = nn.ModuleDict()
        features: dict[str, FeatureSpec] = {}
        for t in self._configs:
            spec = specs[t.name]
            method = spec.get("method", "full")
            if t.name in counts:
                order, ratio = FrequencyOrder.fit(counts[t.name], t.embedding_dim, float(spec.get("ratio", 1.0)))
                if order is not None:
                    self.orders[t.name] = order
                    spec["ratio"] = ratio
                features[t.name] = FeatureSpec(t.name, t.num_embeddings, counts=order.reorder(counts[t.name])
                                               if order is not None else counts[t.name])
                self.frequency[t.name] = "counts"
            else:
                features[t.name] = FeatureSpec(t.name, t.num_embeddings)
                agnostic = AGNOSTIC.get(method, {})
                for k, v in agnostic.items():
                    spec.setdefault(k, v)
                self.frequency[t.name] = "agnostic (no counts)" if agnostic else "not used"
        blind = [n for n, how in self.frequency.items() if how.startswith("agnostic")]
        if blind:
            warnings.warn(f"CompressedEmbeddingBagCollection: no per-id counts for tables {blind}; their "
                          f"frequency-aware methods use the frequency-agnostic form (pass counts= or sample=)")
        methods: list[Method] = []
        for dim in sorted({t.embedding_dim for t in self._configs}):
            group = [t.name for t in self._configs if t.embedding_dim == dim]
            methods += build_methods([features[n] for n in group],
                                     {"dim": dim, "init_std": 0.01, "compression": {"method": "full"},
                                      "features": {n: {"compression": specs[n]} for n in group}})
        self.methods = nn.ModuleList(methods)
        configs = {t.name: t for t in self._configs}
        # An instance (method, j) reads the j-th feature of each of the method's tables; tables
        # with fewer features get empty bags there. One instance per method in the usual case.
        self._instances = [(i, j) for i, m in enumerate(methods)
                           for j in range(max(len(configs[n].feature_names) for n in m.feature_names))]
        self._feature_of = {(i, j, n): configs[n].feature_names[j] for i, j in self._instances
                            for n in methods[i].feature_names if j < len(configs[n].feature_names)}
        self._rows = {t.name: t.num_embeddings for t in self._configs}
        keys = [(f"{k}#{j}", table) for i, j in self._instances for k, table in methods[i].lookups()]
        physical = [t for m in methods for t in m.physical_tables()]
        self.tables = TorchRecTables(physical, keys, optimizer, device=device)
        if torch.device(device or "cpu").type != "meta":
            self.tables.load_weights(seeded_initial_weights(physical, seed))
        self._mean = {f for t in self._configs if t.pooling == PoolingType.MEAN for f in t.feature_names}

    def _check_tables(self) -> None:
        names = [f for t in self._configs for f in t.feature_names]
        if not self._configs or len(set(names)) != len(names):
            raise ValueError(f"tables must be non-empty with unique feature names, got {names}")
        for t in self._configs:
            if t.pooling not in (PoolingType.SUM, PoolingType.MEAN):
                raise ValueError(f"table {t.name!r}: pooling {t.pooling} (SUM or MEAN only)")

    # --- TorchRec's EmbeddingBagCollection interface -----------------------------------------
    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        """The logical tables as passed (what TorchRec models read dims and feature names from)."""
        return self._configs

    def is_weighted(self) -> bool:
        return self._is_weighted

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        jts = features.to_dict()
        missing = [f for f in self.feature_names if f not in jts]
        if missing:
            raise KeyError(f"CompressedEmbeddingBagCollection: input lacks features {missing}")
        batch = features.stride()
        parts = [self._remap(i, j, jts, batch) for i, j in self._instances]
        pooled = self.tables(concat_remapped(parts))
        out: dict[str, torch.Tensor] = {}
        for i, j in self._instances:
            m = self.methods[i]
            combined = m.combine({k: pooled[f"{k}#{j}"] for k, _ in m.lookups()})
            for slot, n in enumerate(m.feature_names):
                f = self._feature_of.get((i, j, n))
                if f is not None:
                    out[f] = combined[:, slot]
        for f in self._mean:  # TorchRec's MEAN: the sum over the bag's ids / its length
            out[f] = out[f] / jts[f].lengths().clamp(min=1).unsqueeze(1).to(out[f].dtype)
        return KeyedTensor(keys=self.feature_names, length_per_key=[out[f].shape[1] for f in self.feature_names],
                           values=torch.cat([out[f] for f in self.feature_names], dim=1))

    def _remap(self, i: int, j: int, jts: dict, batch: int) -> KeyedJaggedTensor:
        """Instance (i, j)'s ids as the method's input (keys = its tables), remapped; keys get '#j'."""
        m = self.methods[i]
        values, lengths, weights = [], [], []
        for n in m.feature_names:
            f = self._feature_of.get((i, j, n))
            if f is None:
                lengths.append(torch.zeros(batch, dtype=torch.int64))
                continue
            jt = jts[f]
            ids = jt.values().long()
            rows = self._rows[n]
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= rows):
                bad = ids[(ids < 0) | (ids >= rows)][0].item()
                raise IndexError(f"feature {f!r}: id {bad} is outside table {n!r}'s [0, {rows})")
            values.append(self.orders[n](ids) if n in self.orders else ids)
            lengths.append(jt.lengths().long())
            if self._is_weighted:
                weights.append(jt.weights())
        device = lengths[0].device
        ids = KeyedJaggedTensor(keys=m.feature_names, values=torch.cat(values) if values else
                                torch.zeros(0, dtype=torch.int64, device=device), lengths=torch.cat(lengths),
                                weights=torch.cat(weights) if self._is_weighted and weights else
                                (torch.zeros(0, device=device) if self._is_weighted else None))
        physical = m.remap(ids)
        return KeyedJaggedTensor(keys=[f"{k}#{j}" for k in physical.keys()], values=physical.values(),
                                 lengths=physical.lengths(), weights=physical.weights_or_none())

    # --- training ------------------------------------------------------------------------------
    def fused_optimizer(self) -> dict[str, torch.optim.Optimizer]:
        """The per-table optimizers fused into backward (unsharded; under DMP: model.fused_optimizer)."""
        return {t.name: self.tables.ebc.embedding_bags[t.name].weight._in_backward_optimizers[0]
                for t in self.tables.tables
                if hasattr(self.tables.ebc.embedding_bags[t.name].weight, "_in_backward_optimizers")}

    # --- accounting ----------------------------------------------------------------------------
    def embedding_bytes(self) -> int:
        """Every tensor the layer needs at inference: tables, method params, frequency orders."""
        order_bytes = sum(b.numel() * b.element_size() for o in self.orders.values() for b in o.buffers())
        return sum(m.embedding_bytes() for m in self.methods) + order_bytes

    def full_embedding_bytes(self) -> int:
        """Bytes of the same tables uncompressed in fp32."""
        return sum(t.num_embeddings * t.embedding_dim * 4 for t in self._configs)

    def compression_ratio(self) -> float:
        return self.full_embedding_bytes() / self.embedding_bytes()

    def hyperparameters(self) -> dict[str, dict]:
        """{table name: what its method's solve chose}."""
        return {n: {"method": m.name, **m.hyperparameters()} for m in self.methods for n in m.feature_names}

    def describe(self) -> list[dict]:
        """Per method: tables, their features, physical tables, bytes, hyperparameters, frequency use."""
        configs = {t.name: t for t in self._configs}
        return [{"method": m.name, "tables": m.feature_names,
                 "features": [f for n in m.feature_names for f in configs[n].feature_names],
                 "physical_tables": [{"name": t.name, "rows": t.rows, "dim": t.dim} for t in m.physical_tables()],
                 "embedding_bytes": m.embedding_bytes(), "full_bytes": m.full_bytes(),
                 "frequency": {n: self.frequency[n] for n in m.feature_names},
                 **({"hyperparameters": m.hyperparameters()} if m.hyperparameters() else {})}
                for m in self.methods]


def _table_specs(tables: list[EmbeddingBagConfig], compression: dict) -> dict[str, dict]:
    """Each table's compression mapping: the one given for all, or its own (tables left out: full)."""
    names = {t.name for t in tables}
    if "method" in compression or "ratio" in compression:
        return {t.name: dict(compression) for t in tables}
    unknown = sorted(set(compression) - names)
    if unknown:
        raise ValueError(f"compression names unknown tables {unknown} (tables: {sorted(names)}); give "
                         f"{{'method': ..., 'ratio': ...}} for all tables or a mapping per table name")
    return {t.name: dict(compression.get(t.name, {"method": "full"})) for t in tables}


def _table_counts(tables: list[EmbeddingBagConfig], counts: dict | None,
                  sample: KeyedJaggedTensor | None) -> dict[str, np.ndarray]:
    """Per-id counts per table: given by table or feature name (features of a table summed), or
    counted in `sample`."""
    out: dict[str, np.ndarray] = {}
    jts = sample.to_dict() if sample is not None else {}
    for t in tables:
        given = [np.asarray(counts[k], dtype=np.float64) for k in (t.name, *t.feature_names)
                 if counts and k in counts]
        given += [count_ids(jts[f].values(), t.num_embeddings) for f in t.feature_names if f in jts]
        for c in given:
            if c.shape != (t.num_embeddings,):
                raise ValueError(f"table {t.name!r}: counts have shape {c.shape}, expected ({t.num_embeddings},)")
        if given:
            out[t.name] = sum(given[1:], given[0])
    return out
