"""Plain descriptions of logical features and physical tables.

A *feature* is a column of the click log (its vocabulary, frequencies, multi-hotness).
A *table* is one dense row-major float table that the fused lookup owns. Compression
methods translate features into tables; tables never live inside a method.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FP32_BYTES = 4


@dataclass(frozen=True)
class TableSpec:
    """One physical table: `rows` × `dim` fp32, initialised N(0, init_std²) (or U(±init_bound))."""

    name: str
    rows: int
    dim: int
    init_std: float = 0.01
    init_bound: float | None = None  # when set, U(-b, b) instead of the normal init

    def __post_init__(self):
        if self.rows < 1 or self.dim < 1:
            raise ValueError(f"table {self.name!r}: rows and dim must be >= 1, got {self.rows}×{self.dim}")

    @property
    def bytes(self) -> int:
        return self.rows * self.dim * FP32_BYTES

    def init_weight(self, generator: "torch.Generator | None" = None):
        import torch

        w = torch.empty(self.rows, self.dim)
        if self.init_bound is not None:
            w.uniform_(-self.init_bound, self.init_bound, generator=generator)
        else:
            w.normal_(0.0, self.init_std, generator=generator)
        return w


@dataclass
class FeatureSpec:
    """One sparse feature after encoding: ids in [0, rows), id 0 the most frequent, `oov_id` last.

    `counts[i]` is how often id i occurred in the training split (OOV included), so
    frequency-aware methods can size blocks by access probability.
    """

    name: str
    rows: int
    multi_hot: bool = False
    mean_length: float = 1.0
    counts: np.ndarray | None = field(default=None, repr=False)

    @property
    def oov_id(self) -> int:
        return self.rows - 1

    def full_bytes(self, dim: int) -> int:
        """Bytes of the uncompressed fp32 table this feature would have."""
        return self.rows * dim * FP32_BYTES

    def probabilities(self) -> np.ndarray:
        """Access probability per id (uniform when no counts are known)."""
        if self.counts is None or self.counts.sum() == 0:
            return np.full(self.rows, 1.0 / self.rows)
        c = self.counts.astype(np.float64)
        return c / c.sum()


# --- fused parts: what a method is, in the arithmetic the Triton kernels run ----------------
# Each logical feature is 1..P parts; part p derives a row of one table from the raw id, pools it
# over the bag, and the feature's output combines its parts (Method.fused_parts builds them).
IDENTITY, HASH, DIV, MOD, BITS = range(5)  # row = id | salted_hash(id, a) mod b | id // a | id mod a
#                                            | b + the code bits of mask a (binary codes)
CONCAT, SUM, MULT = range(3)  # parts into their own columns | added | multiplied (two parts)


@dataclass(frozen=True)
class FusedPart:
    kind: int
    table: str              # the physical table the part reads
    col: int = 0            # first output column (CONCAT)
    a: int = 0              # HASH: the mixed salt (hashing.mixed_salt); DIV/MOD: the divisor; BITS: the mask
    b: int = 0              # HASH: the table's rows; BITS: the block's first row
    weighted: bool = True   # multiplied by the bag's per-sample weight


@dataclass(frozen=True)
class FusedFeature:
    parts: tuple[FusedPart, ...]
    op: int = CONCAT
    scramble: tuple[int, int, int] | None = None  # binary codes: (bits, half, multiplier) of the code's mix
