"""CompressedEmbeddingBagCollection: TorchRec's EmbeddingBagCollection interface over compressed tables.

    ebc = CompressedEmbeddingBagCollection(tables=[EmbeddingBagConfig(...), ...],
                                           compression={"method": "hash", "ratio": 10})
    ebc(kjt) -> KeyedTensor  # keyed by feature name, in TorchRec's order

Each logical table (an EmbeddingBagConfig) is one FeatureSpec that a compression method solves,
and the whole is the pooled collection (remap → one lookup → combine) over a TorchRecLookup:
ONE inner TorchRec EmbeddingBagCollection over the physical tables (`lookup.ebc`). Since that is
a plain TorchRec EBC, DistributedModelParallel shards it with TorchRec's own sharders and
planner; build with device="meta" for DMP, as for a TorchRec EBC. Row-wise Adagrad is fused into
its backward (`apply_optimizer_in_backward`), so under DMP its state is in
`model.fused_optimizer`; unsharded, `fused_optimizer()` gives the per-table optimizers and a
dense optimizer should take `in_backward_optimizer_filter(...)`.

Several feature names of one table read it as a batch: feature j of every table is bags
j·B … (j+1)·B of the collection's input (empty bags where a table has fewer features), so the
methods and the lookup see one batch of J·B, J the most feature names of any table.

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

from embtables.collection import PooledEmbeddingCollection, lookup_layout
from embtables.frequency_order import FrequencyOrder, count_ids
from embtables.kernels.lookup import seeded_initial_weights
from embtables.kernels.optimizer import RowwiseAdagrad
from embtables.kernels.torchrec_lookup import TorchRecLookup
from embtables.methods.base import Method
from embtables.methods.build import build_methods
from embtables.specs import FeatureSpec

# Options that make a frequency-aware method frequency-agnostic, used when a table has no counts.
AGNOSTIC = {"mixed_dim": {"mode": "feature"}, "qr": {"frequency_aware": False}}


class CompressedEmbeddingBagCollection(PooledEmbeddingCollection):
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
        configs = list(tables)
        _check_tables(configs)
        counts = _table_counts(configs, counts, sample)
        specs = _table_specs(configs, compression or {"method": "full"})
        frequency: dict[str, str] = {}
        orders: dict[str, FrequencyOrder] = {}
        features: dict[str, FeatureSpec] = {}
        for t in configs:
            spec = specs[t.name]
            method = spec.get("method", "full")
            if t.name in counts:
                order, ratio = FrequencyOrder.fit(counts[t.name], t.embedding_dim, float(spec.get("ratio", 1.0)))
                if order is not None:
                    orders[t.name] = order
                    spec["ratio"] = ratio
                features[t.name] = FeatureSpec(t.name, t.num_embeddings, counts=order.reorder(counts[t.name])
                                               if order is not None else counts[t.name])
                frequency[t.name] = "counts"
            else:
                features[t.name] = FeatureSpec(t.name, t.num_embeddings)
                agnostic = AGNOSTIC.get(method, {})
                for k, v in agnostic.items():
                    spec.setdefault(k, v)
                frequency[t.name] = "agnostic (no counts)" if agnostic else "not used"
        blind = [n for n, how in frequency.items() if how.startswith("agnostic")]
        if blind:
            warnings.warn(f"CompressedEmbeddingBagCollection: no per-id counts for tables {blind}; their "
                          f"frequency-aware methods use the frequency-agnostic form (pass counts= or sample=)")
        methods: list[Method] = []
        for dim in sorted({t.embedding_dim for t in configs}):
            group = [t.name for t in configs if t.embedding_dim == dim]
            methods += build_methods([features[n] for n in group],
                                     {"dim": dim, "init_std": 0.01, "compression": {"method": "full"},
                                      "features": {n: {"compression": specs[n]} for n in group}})
        physical, keys, _ = lookup_layout(methods)
        lookup = TorchRecLookup(physical, keys, optimizer, device=device)
        if torch.device(device or "cpu").type != "meta":
            lookup.load_weights(seeded_initial_weights(physical, seed))
        dims = {t.embedding_dim for t in configs}
        super().__init__([features[t.name] for t in configs], dims.pop() if len(dims) == 1 else None, methods,
                         lookup)
        self._configs = configs
        self._config_of = {t.name: t for t in configs}
        self._is_weighted = is_weighted
        self.feature_names = [f for t in configs for f in t.feature_names]
        self.frequency = frequency
        self.orders = nn.ModuleDict(orders)
        self._instances = max(len(t.feature_names) for t in configs)  # J: the batch is stacked J times
        self._mean = {f for t in configs if t.pooling == PoolingType.MEAN for f in t.feature_names}

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
        out = self.flat(self._stacked(jts, batch, features.values().device))  # [J·B, Σ table dims]
        pieces, col = [], 0
        for t in self._configs:
            for j, f in enumerate(t.feature_names):
                piece = out[j * batch:(j + 1) * batch, col:col + t.embedding_dim]
                if f in self._mean:  # TorchRec's MEAN: the sum over the bag's ids / its length
                    piece = piece / jts[f].lengths().clamp(min=1).unsqueeze(1).to(piece.dtype)
                pieces.append(piece)
            col += t.embedding_dim
        return KeyedTensor(keys=self.feature_names, length_per_key=[p.shape[1] for p in pieces],
                           values=torch.cat(pieces, dim=1))

    def _stacked(self, jts: dict, batch: int, device: torch.device) -> KeyedJaggedTensor:
        """The collection's input: per table (in its input order), feature j's bags at j·B, ids
        checked and frequency-ordered; empty bags where the table has no feature j."""
        configs = self._config_of
        values, lengths, weights = [], [], []
        for n in self.input_keys:
            names = configs[n].feature_names
            for j in range(self._instances):
                if j >= len(names):
                    lengths.append(torch.zeros(batch, dtype=torch.int64, device=device))
                    continue
                jt = jts[names[j]]
                ids = jt.values().long()
                rows = configs[n].num_embeddings
                if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= rows):
                    bad = ids[(ids < 0) | (ids >= rows)][0].item()
                    raise IndexError(f"feature {names[j]!r}: id {bad} is outside table {n!r}'s [0, {rows})")
                values.append(self.orders[n](ids) if n in self.orders else ids)
                lengths.append(jt.lengths().long())
                if self._is_weighted:
                    weights.append(jt.weights())
        return KeyedJaggedTensor(keys=self.input_keys, values=torch.cat(values), lengths=torch.cat(lengths),
                                 weights=torch.cat(weights) if self._is_weighted else None)

    # --- training ------------------------------------------------------------------------------
    def fused_optimizer(self) -> dict[str, torch.optim.Optimizer]:
        """The per-table optimizers fused into backward (unsharded; under DMP: model.fused_optimizer)."""
        bags = self.lookup.ebc.embedding_bags
        return {t.name: bags[t.name].weight._in_backward_optimizers[0]
                for t in self.tables if hasattr(bags[t.name].weight, "_in_backward_optimizers")}

    # --- accounting ----------------------------------------------------------------------------
    def embedding_bytes(self) -> int:
        """Every tensor the layer needs at inference: tables, method params, frequency orders."""
        order_bytes = sum(b.numel() * b.element_size() for o in self.orders.values() for b in o.buffers())
        return super().embedding_bytes() + order_bytes

    def compression_ratio(self) -> float:
        return self.full_embedding_bytes() / self.embedding_bytes()

    def hyperparameters(self) -> dict[str, dict]:
        """{table name: what its method's solve chose}."""
        return {n: {"method": m.name, **m.hyperparameters()} for m in self.methods for n in m.feature_names}

    def describe(self) -> list[dict]:
        """Per method: tables, their features, physical tables, bytes, hyperparameters, frequency use."""
        configs = self._config_of
        return [{"method": m.name, "tables": m.feature_names,
                 "features": [f for n in m.feature_names for f in configs[n].feature_names],
                 "physical_tables": [{"name": t.name, "rows": t.rows, "dim": t.dim} for t in m.physical_tables()],
                 "embedding_bytes": m.embedding_bytes(), "full_bytes": m.full_bytes(),
                 "frequency": {n: self.frequency[n] for n in m.feature_names},
                 **({"hyperparameters": m.hyperparameters()} if m.hyperparameters() else {})}
                for m in self.methods]


def _check_tables(tables: list[EmbeddingBagConfig]) -> None:
    names = [f for t in tables for f in t.feature_names]
    if not tables or len(set(names)) != len(names):
        raise ValueError(f"tables must be non-empty with unique feature names, got {names}")
    for t in tables:
        if t.pooling not in (PoolingType.SUM, PoolingType.MEAN):
            raise ValueError(f"table {t.name!r}: pooling {t.pooling} (SUM or MEAN only)")


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
