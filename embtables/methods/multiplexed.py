"""multiplexed: unified embedding / feature multiplexing (Coleman et al., NeurIPS 2023).

Every feature given this method shares ONE table of m rows and dim d/c (or `tables` = S
sub-tables, the (feature, chunk) slots dealt round-robin over them). Chunk j of feature f
looks up row h_{f,j}(id) mod m with its own salt, and the feature's embedding is the
concatenation of its c chunk vectors. Salts differ per (feature, chunk), so an id's chunks
collide with different ids and two features never share a collision pattern: the
concatenation is unique per id with high probability even when every chunk collides.

m comes from the budget over all the group's features together (`solve_group`), so the
shared space is sized by Σ n_f, not by any one feature.

Frequency-aware option (`private` = share of the rows): the ids most often looked up per
sample, across all the group's features, get private rows (each of its chunks its own row,
so the id has a collision-free embedding); every other id hashes into the rest. Ids are in
descending frequency order, so feature f's private ids are simply ids < K_f.

A shared table is read by several slots, each pooled on its own: `lookups()` lists
(slot key, table) pairs and the collection runs one fused lookup with a feature→table map.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torchrec import KeyedJaggedTensor

from embtables.errors import ConfigError
from embtables.methods.base import Method
from embtables.methods.salted_hash import salt_of, salted_hash
from embtables.specs import FeatureSpec, TableSpec


class Multiplexed(Method):
    name = "multiplexed"

    def __init__(self, features: list[FeatureSpec], dim: int, rows: int, chunks: int = 2,
                 tables: int = 1, private_ids: list[int] | None = None, init_std: float = 0.01):
        super().__init__(features, dim)
        if chunks < 1 or dim % chunks:
            raise ValueError(f"multiplexed: chunks ({chunks}) must divide dim ({dim})")
        if tables < 1:
            raise ValueError(f"multiplexed: tables must be >= 1, got {tables}")
        self.rows, self.chunks, self.n_tables, self.init_std = int(rows), chunks, tables, init_std
        self.chunk_dim = dim // chunks
        self.private_ids = [int(k) for k in private_ids] if private_ids else [0] * len(features)
        # Slot order is chunk-major (all features' chunk 0, then chunk 1, …): remap then hashes
        # the whole id stream once per chunk and the results are already in key order.
        self.slots = [(f.name, j) for j in range(chunks) for f in features]
        self.salts = [salt_of(f, j) for f, j in self.slots]
        # Round-robin over the slots in feature-major order: with tables == chunks, chunk j → table j.
        index = {f.name: i for i, f in enumerate(features)}
        self.slot_table = [(index[f] * chunks + j) % tables for f, j in self.slots]
        # Each table starts with its slots' private rows, one block per slot; hashing uses the rest.
        private = [self.private_ids[index[f]] for f, _ in self.slots]
        self.private_rows = [sum(k for k, t in zip(private, self.slot_table) if t == table) for table in range(tables)]
        if max(self.private_rows) >= self.rows:
            raise ValueError(f"multiplexed: {max(self.private_rows)} private rows leave no hashed rows of {self.rows}")
        starts = [sum(k for k, t in zip(private[:s], self.slot_table[:s]) if t == self.slot_table[s])
                  for s in range(len(self.slots))]
        per_slot = torch.tensor([[salt, k, start, self.private_rows[t]] for salt, k, start, t
                                 in zip(self.salts, private, starts, self.slot_table)])
        # [chunks, features, (salt, private ids, first private row, first hashed row)]; from names
        # and hyperparameters, so not state (nor in embedding_bytes).
        self.register_buffer("_slot", per_slot.view(chunks, len(features), 4), persistent=False)

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
        chunks = []
        for j in range(self.chunks):
            salt, private, first_private, first_hashed = self._slot[j].repeat_interleave(per_key, dim=0).unbind(1)
            hashed = first_hashed + salted_hash(values, salt) % (self.rows - first_hashed)
            chunks.append(torch.where(values < private, first_private + values, hashed))
        return KeyedJaggedTensor(keys=self.slot_keys(), values=torch.cat(chunks),
                                 lengths=lengths.repeat(self.chunks),
                                 weights=None if weights is None else weights.repeat(self.chunks))

    def combine(self, pooled: dict[str, torch.Tensor]) -> torch.Tensor:
        keys = self.slot_keys()
        n = len(self.features)
        chunks = [torch.stack([pooled[keys[j * n + i]] for i in range(n)], dim=1) for j in range(self.chunks)]
        return torch.cat(chunks, dim=2)  # [B, F, c · d/c]

    def hyperparameters(self) -> dict:
        return {"rows": self.rows, "chunks": self.chunks, "chunk_dim": self.chunk_dim, "tables": self.n_tables,
                "private_ids": dict(zip(self.feature_names, self.private_ids)),
                "achieved_ratio": round(self.full_bytes() / self.embedding_bytes(), 3)}

    # --- solving ------------------------------------------------------------------------
    @classmethod
    def solve(cls, feature: FeatureSpec, dim: int, ratio: float, chunks: int = 2, tables: int = 1,
              private: float = 0.0, init_std: float = 0.01) -> "Multiplexed":
        return cls.solve_group([feature], dim, ratio, chunks=chunks, tables=tables, private=private,
                               init_std=init_std)[0]

    @classmethod
    def solve_group(cls, features: list[FeatureSpec], dim: int, ratio: float, chunks: int = 2,
                    tables: int = 1, private: float = 0.0, init_std: float = 0.01) -> list["Multiplexed"]:
        """One method over all features: S·m rows of dim d/c hold Σ n_f·d / ratio floats."""
        if chunks < 1 or dim % chunks:
            raise ConfigError(f"embedding.compression.chunks: {chunks} must divide embedding.dim ({dim})")
        if not 0 <= private < 1:
            raise ConfigError(f"embedding.compression.private: a share of the rows in [0, 1), got {private}")
        floats = sum(f.rows for f in features) * dim / ratio
        rows = math.floor(floats / (tables * (dim // chunks)))
        if rows < 1:
            raise ConfigError(f"compression ratio {ratio:g} is out of reach for method 'multiplexed' on "
                              f"{[f.name for f in features]}: even one row per table exceeds the budget "
                              f"of {4 * floats:.0f} bytes; lower the ratio or `tables`")
        budget_ids = math.floor(private * rows * tables / chunks)
        while True:  # shrink until every table keeps hashed rows (slots spread unevenly when S ∤ c)
            k = most_frequent(features, budget_ids)
            try:
                return [cls(features, dim, rows, chunks=chunks, tables=tables, private_ids=k, init_std=init_std)]
            except ValueError:
                budget_ids = budget_ids * 9 // 10


def most_frequent(features: list[FeatureSpec], n: int) -> list[int]:
    """K_f per feature: how many of the n ids looked up most per sample, over all features,
    are feature f's. Features without counts get none."""
    if n <= 0:
        return [0] * len(features)
    # Expected lookups per sample: count / samples, samples = Σ counts / mean bag length.
    rates = [f.probabilities() * f.mean_length if f.counts is not None else np.zeros(f.rows) for f in features]
    flat = np.concatenate(rates)
    top = np.argsort(-flat, kind="stable")[:n]
    top = top[flat[top] > 0]
    owner = np.searchsorted(np.cumsum([f.rows for f in features]), top, side="right")
    return np.bincount(owner, minlength=len(features)).tolist()
