"""binary_code: binary-code-based hash embedding (BH; Yan et al., CIKM 2021).

id → b-bit code (b = ⌈log2 n⌉; the id itself, or a fixed bijective scramble of it) → k blocks
of t_i bits → block i's value v_i picks row offset_i + v_i of one merged table of Σ 2^{t_i}
rows → the k rows are summed (default) or concatenated (k tables of dim d/k). "succession"
gives block i consecutive bits, "skip" interleaves them (bit j → block j mod k when the blocks
are equal). The blocks partition the code's bits and the code is a bijection, so every id has
its own k-tuple of rows: no two ids share a representation.

Blocks need not be equal (the paper's t bits each): with equal blocks a 100k-row feature can
only be 1× or ≥130× smaller, so the solve gives the widest block as many bits as the budget
allows and the rest to narrower blocks (e.g. 17 bits → [13, 4] at 10×).

Ids are in descending frequency order, so with the plain id and "succession" the 2^t most
frequent ids differ in block 0 (the lowest bits) and share the other blocks' rows.
"""
from __future__ import annotations

import math

import torch
from torchrec import KeyedJaggedTensor

from embtables.methods.base import Method
from embtables.methods.budget import solve_within_budget
from embtables.specs import BITS, CONCAT, SUM, FeatureSpec, FusedFeature, FusedPart, TableSpec

LAYOUTS = ("succession", "skip")
FUSIONS = ("sum", "concat")
_SCRAMBLE_MULT = 0x9E3779B97F4A7C15 >> 3 | 1  # odd: multiplying by it is a bijection mod 2^b


class BinaryCode(Method):
    name = "binary_code"

    def __init__(self, feature: FeatureSpec, dim: int, block_bits: list[int], layout: str = "succession",
                 fusion: str = "sum", scramble: bool = False, init_std: float = 0.01):
        super().__init__([feature], dim)
        if layout not in LAYOUTS or fusion not in FUSIONS:
            raise ValueError(f"binary_code: layout ∈ {LAYOUTS}, fusion ∈ {FUSIONS}; got {layout!r}, {fusion!r}")
        self.bits = code_bits(feature.rows)
        self.block_bits = [int(t) for t in block_bits]
        if sum(self.block_bits) != self.bits or min(self.block_bits) < 1:
            raise ValueError(f"binary_code: block bits {block_bits} must be >= 1 and sum to {self.bits}"
                             f" (the code length for {feature.rows} rows)")
        self.k = len(self.block_bits)
        if fusion == "concat" and dim % self.k:
            raise ValueError(f"binary_code: concat needs the block count ({self.k}) to divide dim ({dim})")
        self.layout, self.fusion, self.scramble, self.init_std = layout, fusion, scramble, init_std
        self.offsets = [sum(2 ** t for t in self.block_bits[:i]) for i in range(self.k)]
        owner, place = bit_owners(self.block_bits, layout)
        # Derived from the hyperparameters, so not part of the state (nor of embedding_bytes).
        self.register_buffer("_owner", owner, persistent=False)
        self.register_buffer("_place", place, persistent=False)
        self.register_buffer("_row_offsets", torch.tensor(self.offsets), persistent=False)

    # --- tables ---------------------------------------------------------------------------
    def table_names(self) -> list[str]:
        f = self.features[0].name
        return [f"{f}/bc"] if self.fusion == "sum" else [f"{f}/bc{i}" for i in range(self.k)]

    def physical_tables(self) -> list[TableSpec]:
        if self.fusion == "sum":  # k summed N(0, s²) rows: s = init_std/√k keeps the sum at init_std
            rows = sum(2 ** t for t in self.block_bits)
            return [TableSpec(self.table_names()[0], rows, self.dim, init_std=self.init_std / math.sqrt(self.k))]
        return [TableSpec(name, 2 ** t, self.dim // self.k, init_std=self.init_std)
                for name, t in zip(self.table_names(), self.block_bits)]

    # --- codes --------------------------------------------------------------------------------
    def code(self, ids: torch.Tensor) -> torch.Tensor:
        """The b-bit code of each id: the id, or a bijection of [0, 2^b) onto itself."""
        ids = ids.long()
        if not self.scramble:
            return ids
        mask, half = (1 << self.bits) - 1, max(1, self.bits // 2)
        x = ids
        for _ in range(2):  # xorshift and odd multiply are each invertible mod 2^b
            x = (x ^ (x >> half)) & mask
            x = (x * (_SCRAMBLE_MULT & mask)) & mask
        return x

    def block_values(self, ids: torch.Tensor) -> torch.Tensor:
        """[N, k]: block i's value v_i ∈ [0, 2^{t_i}) for each id."""
        code = self.code(ids)
        positions = torch.arange(self.bits, device=code.device)
        bits = (code.unsqueeze(1) >> positions) & 1  # [N, b]: bit j of each code
        values = torch.zeros(code.shape[0], self.k, dtype=torch.long, device=code.device)
        return values.index_add_(1, self._owner, bits << self._place)

    def remap(self, ids: KeyedJaggedTensor) -> KeyedJaggedTensor:
        values = self.block_values(ids.values())  # [N, k]
        lengths, weights = ids.lengths(), ids.weights_or_none()
        if self.fusion == "sum":  # each id becomes k rows of the merged table, in its own bag
            rows = values + self._row_offsets
            return KeyedJaggedTensor(
                keys=self.table_names(), values=rows.reshape(-1), lengths=lengths * self.k,
                weights=None if weights is None else weights.repeat_interleave(self.k))
        return KeyedJaggedTensor(
            keys=self.table_names(), values=values.t().reshape(-1), lengths=lengths.repeat(self.k),
            weights=None if weights is None else weights.repeat(self.k))

    def combine(self, pooled: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([pooled[n] for n in self.table_names()], dim=1).unsqueeze(1)

    def fused_parts(self) -> list[FusedFeature]:
        masks = [0] * self.k  # the code bits each block takes
        for bit, owner in enumerate(self._owner.tolist()):
            masks[owner] |= 1 << bit
        names = self.table_names()
        if self.fusion == "sum":
            parts, op = [FusedPart(BITS, names[0], a=m, b=off) for m, off in zip(masks, self.offsets)], SUM
        else:
            width = self.dim // self.k
            parts, op = [FusedPart(BITS, n, a=m, col=i * width) for i, (n, m) in enumerate(zip(names, masks))], CONCAT
        mask = (1 << self.bits) - 1
        scramble = (self.bits, max(1, self.bits // 2), _SCRAMBLE_MULT & mask) if self.scramble else None
        return [FusedFeature(tuple(parts), op, scramble)]

    def hyperparameters(self) -> dict:
        return {"bits": self.bits, "blocks": self.k, "block_bits": self.block_bits, "layout": self.layout,
                "fusion": self.fusion, "scramble": self.scramble,
                "achieved_ratio": round(self.full_bytes() / self.embedding_bytes(), 3)}

    # --- solving ------------------------------------------------------------------------
    @classmethod
    def fit(cls, feature: FeatureSpec, dim: int, ratio: float, layout: str = "succession",
            fusion: str = "sum", scramble: bool = False, init_std: float = 0.01) -> "BinaryCode":
        """The largest blocks first within full / ratio; all blocks one bit wide if nothing fits."""
        bits = code_bits(feature.rows)
        floats = feature.rows * dim / ratio
        if fusion == "sum":
            blocks = greedy_blocks(bits, math.floor(floats / dim)) or [1] * bits
        else:  # concat: k tables of dim d/k; the fewest blocks that fit
            ks = [k for k in range(1, min(bits, dim) + 1) if dim % k == 0]
            blocks = next((b for k in ks if (b := greedy_blocks(bits, math.floor(floats / (dim // k)), k))),
                          even_blocks(bits, ks[-1]))
        return cls(feature, dim, blocks, layout, fusion, scramble, init_std)

    @classmethod
    def solve(cls, feature: FeatureSpec, dim: int, ratio: float, layout: str = "succession",
              fusion: str = "sum", scramble: bool = False, init_std: float = 0.01) -> "BinaryCode":
        return solve_within_budget(cls.fit, [feature], dim, ratio, layout=layout, fusion=fusion,
                                   scramble=scramble, init_std=init_std)[0]

    @classmethod
    def solve_group(cls, features: list[FeatureSpec], dim: int, ratio: float, layout: str = "succession",
                    fusion: str = "sum", scramble: bool = False, init_std: float = 0.01) -> list["BinaryCode"]:
        return solve_within_budget(cls.fit, features, dim, ratio, layout=layout, fusion=fusion,
                                   scramble=scramble, init_std=init_std)


def bit_owners(block_bits: list[int], layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """For each code bit j (lowest first): the block that owns it, and its place inside that block."""
    k = len(block_bits)
    if layout == "succession":  # block i: the next t_i bits, lowest bits in block 0
        owner = [i for i, t in enumerate(block_bits) for _ in range(t)]
    else:  # skip: bits dealt round-robin (j mod k for equal blocks), passing blocks already full
        owner, seen, i = [], [0] * k, 0
        while len(owner) < sum(block_bits):
            if seen[i] < block_bits[i]:
                owner.append(i)
                seen[i] += 1
            i = (i + 1) % k
    seen = [0] * k
    place = []
    for o in owner:
        place.append(seen[o])
        seen[o] += 1
    return torch.tensor(owner), torch.tensor(place)


def _fewest_rows(bits: int, blocks: int | None) -> float:
    """Fewest rows that hold `bits` bits in `blocks` blocks (any count when None)."""
    if blocks is None:
        return 2 * bits  # one-bit blocks: 2^t ≥ 2t
    if bits < blocks or (blocks == 0 and bits):
        return math.inf
    return sum(2 ** t for t in even_blocks(bits, blocks)) if blocks else 0


def greedy_blocks(bits: int, rows: int, blocks: int | None = None) -> list[int] | None:
    """Block widths, widest first, with Σ 2^t ≤ rows (exactly `blocks` of them when given).

    Each block takes the most bits that still leave room for the remaining bits, so the
    budget is spent on the widest table (the one the most frequent ids tell apart in).
    """
    out: list[int] = []
    while bits:
        later = None if blocks is None else blocks - len(out) - 1
        if later is not None and later < 0:
            return None
        t = next((t for t in range(bits, 0, -1) if 2 ** t + _fewest_rows(bits - t, later) <= rows), None)
        if t is None:
            return None
        out.append(t)
        bits, rows = bits - t, rows - 2 ** t
    return out if blocks is None or len(out) == blocks else None


def even_blocks(bits: int, blocks: int) -> list[int]:
    """`bits` dealt over `blocks` blocks as evenly as possible, the extra bits to the first."""
    return [bits // blocks + (1 if i < bits % blocks else 0) for i in range(blocks)]


def code_bits(rows: int) -> int:
    """Bits to give each of `rows` ids its own code (at least one)."""
    return max(1, (rows - 1).bit_length())
