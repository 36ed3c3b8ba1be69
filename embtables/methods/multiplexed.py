"""multiplexed: unified embedding / feature multiplexing (Coleman et al., NeurIPS 2023).

Every feature given this method shares ONE table of m rows and dim d/c (or `tables` = S
sub-tables, the (feature, chunk) slots dealt round-robin over them). Chunk j of feature f
looks up row h_{f,j}(id) mod m with its own salt, and the feature's embedding is the
concatenation of its c chunk vectors. Salts differ per (feature, chunk), so an id's chunks
collide with different ids (two ids sharing one chunk row rarely share the others) and the
features' collision patterns are independent.

m comes from the budget over all the group's features together (`solve_group`), so the
shared space is sized by Σ n_f, not by any one feature.

`solve` picks 4 chunks (2 or 1 when 4 does not divide d; the constructor's default is 2): more
chunks per feature lower the odds that two ids share every chunk row. Measured with DLRM: MovieLens 100× AUC 0.729/0.733 (2
chunks, two seeds) → 0.749/0.748 (4) → 0.751 (8); synth 100× 0.737 either way, synth 10×
0.724 (2) vs 0.720 (4). One shared table beat 4 sub-tables (0.748 vs 0.736, MovieLens 100×).

No frequency-aware rows: giving the most-looked-up ids private rows (tried with 25–50% of the
rows) moved AUC by no more than run-to-run noise on MovieLens and synth, so it was left out.

Options as TensorFlow Recommenders' unified-embedding layer allows them:
- `combiner: sum | mean` pools a bag by sum (default) or mean (TPU embedding's default): each
  id's weight becomes w / Σ_bag w (1/length unweighted) in remap, so every backend pools the mean.
- `chunks` per feature ({feature: count}, the rest the default). There a feature's width is
  count × the table width; here every feature returns d, so a feature's chunks are d/c wide,
  and the features of each chunk count share one table (set) of that width, sized by their
  share Σ n_f of the budget.

A shared table is read by several slots, each pooled on its own: `lookups()` lists
(slot key, table) pairs and the collection runs one pooled lookup with a key→table map.
"""
from __future__ import annotations

import math

import torch
from torchrec import KeyedJaggedTensor

from embtables.errors import ConfigError
from embtables.methods.base import Method
from embtables.hashing import mixed_salt, salt_of, salted_hash
from embtables.specs import HASH, FeatureSpec, FusedFeature, FusedPart, TableSpec


class Multiplexed(Method):
    name = "multiplexed"

    def __init__(self, features: list[FeatureSpec], dim: int, rows: int, chunks: int = 2,
                 tables: int = 1, init_std: float = 0.01, combiner: str = "sum"):
        super().__init__(features, dim)
        if combiner not in COMBINERS:
            raise ConfigError(f"embedding.compression.combiner: {combiner!r} is not one of {COMBINERS}")
        self.combiner = combiner
        if chunks < 1 or dim % chunks:
            raise ValueError(f"multiplexed: chunks ({chunks}) must divide dim ({dim})")
        if tables < 1:
            raise ValueError(f"multiplexed: tables must be >= 1, got {tables}")
        self.rows, self.chunks, self.n_tables, self.init_std = int(rows), chunks, tables, init_std
        self.chunk_dim = dim // chunks
        # Slot order is chunk-major (all features' chunk 0, then chunk 1, …): remap then hashes
        # the whole id stream once per chunk and the results are already in key order.
        self.slots = [(f.name, j) for j in range(chunks) for f in features]
        self.salts = [salt_of(f, j) for f, j in self.slots]
        # Round-robin over the slots in feature-major order: with tables == chunks, chunk j → table j.
        index = {f.name: i for i, f in enumerate(features)}
        self.slot_table = [(index[f] * chunks + j) % tables for f, j in self.slots]
        # [chunks, features] salts; derived from names, so not state (nor in embedding_bytes).
        self.register_buffer("_salts", torch.tensor(self.salts).view(chunks, len(features)), persistent=False)

    def table_names(self) -> list[str]:
        return [f"{self.features[0].name}/multiplexed{i}" for i in range(self.n_tables)]

    def slot_keys(self) -> list[str]:
        return [f"{f}/mux{j}" for f, j in self.slots]

    def physical_tables(self) -> list[TableSpec]:
        return [TableSpec(name, self.rows, self.chunk_dim, init_std=self.init_std) for name in self.table_names()]

    def lookups(self) -> list[tuple[str, str]]:
        """(key in remap's output, physical table it reads), one per (feature, chunk) slot."""
        names = self.table_names()
        return [(key, names[t]) for key, t in zip(self.slot_keys(), self.slot_table)]

    def remap(self, ids: KeyedJaggedTensor) -> KeyedJaggedTensor:
        values, lengths, weights = ids.values().long(), ids.lengths(), ids.weights_or_none()
        per_key = torch.tensor(ids.length_per_key(), device=values.device)
        # One pass per chunk over every feature's ids, each id hashed with its feature's salt.
        chunks = [salted_hash(values, self._salts[j].repeat_interleave(per_key)) % self.rows
                  for j in range(self.chunks)]
        if self.combiner == "mean":
            weights = mean_weights(lengths, weights, values.device)
        return KeyedJaggedTensor(keys=self.slot_keys(), values=torch.cat(chunks),
                                 lengths=lengths.repeat(self.chunks),
                                 weights=None if weights is None else weights.repeat(self.chunks))

    def fused_parts(self) -> list[FusedFeature]:
        if self.combiner != "sum":
            raise ValueError(f"the Triton lookup pools bags by sum; multiplexed combiner {self.combiner!r} has "
                             f"no fused form (use another backend)")
        names, n = self.table_names(), len(self.features)
        return [FusedFeature(tuple(FusedPart(HASH, names[self.slot_table[j * n + i]], col=j * self.chunk_dim,
                                             a=mixed_salt(self.salts[j * n + i]), b=self.rows)
                                   for j in range(self.chunks)))  # slots are chunk-major
                for i in range(n)]

    def combine(self, pooled: dict[str, torch.Tensor]) -> torch.Tensor:
        keys = self.slot_keys()
        n = len(self.features)
        chunks = [torch.stack([pooled[keys[j * n + i]] for i in range(n)], dim=1) for j in range(self.chunks)]
        return torch.cat(chunks, dim=2)  # [B, F, c · d/c]

    def combine_columns(self, starts: dict[str, int]) -> list[int]:
        keys, n = self.slot_keys(), len(self.features)
        return [starts[keys[j * n + i]] + k for i in range(n) for j in range(self.chunks)
                for k in range(self.chunk_dim)]

    def hyperparameters(self) -> dict:
        return {"rows": self.rows, "chunks": self.chunks, "chunk_dim": self.chunk_dim, "tables": self.n_tables,
                "combiner": self.combiner,
                "achieved_ratio": round(self.full_bytes() / self.embedding_bytes(), 3)}

    # --- solving ------------------------------------------------------------------------
    @classmethod
    def solve(cls, feature: FeatureSpec, dim: int, ratio: float, **options) -> "Multiplexed":
        return cls.solve_group([feature], dim, ratio, **options)[0]

    @classmethod
    def solve_group(cls, features: list[FeatureSpec], dim: int, ratio: float, chunks: int | dict | None = None,
                    tables: int = 1, init_std: float = 0.01, combiner: str = "sum") -> list["Multiplexed"]:
        """One method over all features with one chunk count: S·m rows of dim d/c hold
        Σ n_f·d / ratio floats. `chunks` as {feature: count}: one method per count."""
        default = next(c for c in (4, 2, 1) if dim % c == 0)
        per_feature = chunks if isinstance(chunks, dict) else {}
        base = default if chunks is None or isinstance(chunks, dict) else chunks
        counts = [per_feature.get(f.name, base) for f in features]
        groups: dict[int, list[FeatureSpec]] = {}
        for f, c in zip(features, counts):
            groups.setdefault(c, []).append(f)
        return [cls._solve_one(group, dim, ratio, c, tables, init_std, combiner) for c, group in groups.items()]

    @classmethod
    def _solve_one(cls, features, dim, ratio, chunks, tables, init_std, combiner) -> "Multiplexed":
        if not isinstance(chunks, int) or chunks < 1 or dim % chunks:
            raise ConfigError(f"embedding.compression.chunks: {chunks} must divide embedding.dim ({dim})")
        floats = sum(f.rows for f in features) * dim / ratio
        rows = math.floor(floats / (tables * (dim // chunks)))
        if rows < 1:
            raise ConfigError(f"compression ratio {ratio:g} is out of reach for method 'multiplexed' on "
                              f"{[f.name for f in features]}: even one row per table exceeds the budget "
                              f"of {4 * floats:.0f} bytes; lower the ratio or `tables`")
        return cls(features, dim, rows, chunks=chunks, tables=tables, init_std=init_std, combiner=combiner)


COMBINERS = ("sum", "mean")


def mean_weights(lengths: torch.Tensor, weights: torch.Tensor | None, device) -> torch.Tensor:
    """Per-id weights that make a bag's weighted sum its mean: w / Σ_bag w (1/length unweighted)."""
    bag = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)
    w = torch.ones(bag.numel(), device=device) if weights is None else weights.float()
    total = torch.zeros(lengths.numel(), device=device).index_add_(0, bag, w)
    return w / torch.where(total == 0, 1.0, total)[bag]
