"""mixed_dim: mixed-dimension embeddings (MDE, Ginart et al. 2021) by the power rule.

Block mode: a feature's ids, already in descending frequency order, are cut into
contiguous blocks with geometric boundaries (a small head, a long tail). Block k gets dim
d_k = λ·p_k^α, p_k = the block's mean access probability, α the temperature; its rows live in
a rows_k × d_k physical table and a projection P_k (d_k × d, no bias) brings them to d.
One λ serves every block of every feature in the group (each feature is read once per
sample, so per-id probabilities compare across features): bytes go where accesses are.
Feature mode: every feature is one block, p_f = 1/rows_f (uniform access within a feature,
as in the MDE paper). The default, auto, is block mode while every id keeps its own row and
feature mode once the budget makes ids share rows (ratios beyond about d).

Reference mode (`mode: reference`) is DLRM's `md_solver` with a base dim (its `--md-flag`): one
block per feature, dims set by alpha alone (no budget, so no `ratio`): the feature with the
fewest rows n_min keeps the base dim d, every other gets round(d·(n_min/n)^α), at least 1
(α=0 gives d everywhere), and `round_dims` takes 2^round(log2 dim) as its `--md-round-dims`.
Every id keeps its own row; a block below d is projected to d.

λ is searched so tables + projections fit the budget; each feature's head block keeps d;
the leftover of integer rounding goes to the most frequent blocks that can still grow
(fill), and in block mode to a prefix of the next block, split off with one more dim. Where
even 1-dim rows for every id do not fit (ratios beyond d), a block's "dimension" drops below
1 by sharing rows: its ids fold onto fewer 1-dim rows (id mod rows_k).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from embtables.errors import ConfigError
from embtables.methods.base import Method
from embtables.specs import FP32_BYTES, FeatureSpec, TableSpec


def geometric_ends(rows: int, blocks: int) -> list[int]:
    """Exclusive block ends at rows^(k/K): head blocks small, the tail block the largest."""
    ends = []
    for k in range(1, blocks + 1):
        end = rows if k == blocks else int(round(rows ** (k / blocks)))
        if end > (ends[-1] if ends else 0):
            ends.append(min(end, rows))
    return ends


def plan_bytes(dims, rows, dim: int) -> int:
    """Tables plus projections (a block of dim d needs none: its projection is the identity)."""
    return sum(r * k + (k * dim if k < dim else 0) for r, k in zip(rows, dims)) * FP32_BYTES


def power_rule(lam: float, probs, sizes, alpha: float, dim: int, min_dim: int = 1):
    """(dims, rows) at scale λ: d = round(λ·p^α) capped at dim; below min_dim, a block keeps
    min_dim and shares rows instead (x floats per id on average)."""
    dims, rows = [], []
    for p, n in zip(probs, sizes):
        x = lam * p ** alpha
        if x >= min_dim:
            dims.append(min(dim, int(math.floor(x + 0.5))))
            rows.append(n)
        else:
            dims.append(min_dim)
            rows.append(max(1, math.ceil(n * x / min_dim)))
    return dims, rows


def largest_lambda(probs, sizes, dim: int, budget: float, alpha: float, min_dim: int = 1) -> float:
    """The largest λ whose plan fits. Bytes are not monotone in λ (a block reaching dim d drops
    its projection), but between the λs where some dim changes only shared rows grow, so
    bytes rise there: find the highest such interval that starts feasible, then bisect in it."""
    w = [p ** alpha for p in probs if p > 0]
    cost = lambda lam: plan_bytes(*power_rule(lam, probs, sizes, alpha, dim, min_dim), dim)  # noqa: E731
    breaks = sorted({min_dim / x for x in w} | {(j - 0.5) / x for x in w for j in range(min_dim + 1, dim + 1)})
    top = 2 * breaks[-1]  # every block at dim d
    if cost(top) <= budget:
        return top
    edges = [1e-30] + breaks + [top]
    for lo, hi in reversed(list(zip(edges, edges[1:]))):
        lo *= 1 + 1e-9  # just inside the interval, past float ties at its edge
        if cost(lo) > budget:
            continue
        for _ in range(100):
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if cost(mid) <= budget else (lo, mid)
        return lo
    return 1e-30  # nothing fits: the smallest plan


def solve_dims(probs, sizes, dim: int, budget: float, alpha: float, min_dim: int = 1):
    """Power-rule plan within `budget` bytes → (λ, dims, rows)."""
    lam = largest_lambda(probs, sizes, dim, budget, alpha, min_dim)
    return (lam, *power_rule(lam, probs, sizes, alpha, dim, min_dim))


def solve_plan(probs, sizes, heads: list[int], dim: int, budget: float, alpha: float, align: int = 1,
               fill: bool = True, min_dim: int = 1):
    """The head blocks keep dim d and the power rule sizes the other blocks within what is left
    (without that, at ratios beyond d the rule shrinks even the most frequent ids to 1–2 dims);
    if the heads alone do not fit, the rule sizes every block. Returns (λ, dims, rows)."""
    rest = [k for k in range(len(sizes)) if k not in heads]
    left = budget - sum(sizes[h] for h in heads) * dim * FP32_BYTES
    lam, dims, rows = None, None, None
    if heads and rest and left > 0:
        lam, d_rest, r_rest = solve_dims([probs[k] for k in rest], [sizes[k] for k in rest], dim, left, alpha,
                                         min_dim)
        dims, rows = [dim] * len(sizes), list(sizes)
        for k, d_k, r_k in zip(rest, d_rest, r_rest):
            dims[k], rows[k] = d_k, r_k
        if plan_bytes(dims, rows, dim) > budget:
            lam = None
    if lam is None:
        lam, dims, rows = solve_dims(probs, sizes, dim, budget, alpha, min_dim)
    if align > 1:
        dims = align_dims(dims, rows, dim, budget, align)
    if fill:
        dims = fill_dims(dims, rows, sizes, probs, dim, budget, align)
    return lam, dims, rows


def allowed(v: int, dim: int, align: int) -> bool:
    return align <= 1 or v < align or v % align == 0 or v == dim


def align_dims(dims, rows, dim, budget, align):
    """Dims ≥ align to the nearest multiple of align (FBGEMM-friendly), or down if that busts the budget."""
    near = [min(dim, align * int(math.floor(k / align + 0.5))) if k >= align else k for k in dims]
    if plan_bytes(near, rows, dim) <= budget:
        return near
    return [min(dim, align * (k // align)) if k >= align else k for k in dims]


def growable(dims, rows, sizes, probs, dim):
    """(block, cap) in frequency order for blocks with unshared rows; cap keeps dims ordered."""
    order = sorted(range(len(dims)), key=lambda k: -probs[k])
    for i, k in enumerate(order):
        if rows[k] == sizes[k]:
            yield k, dim if i == 0 else dims[order[i - 1]]


def fill_dims(dims, rows, sizes, probs, dim, budget, align):
    """Spend what integer rounding left over: raise blocks, most frequent first, never above the
    dim of a more frequent block (so dims stay ordered as the power rule orders them)."""
    dims = list(dims)
    for k, cap in growable(dims, rows, sizes, probs, dim):
        for v in range(cap, dims[k], -1):
            trial = dims[:k] + [v] + dims[k + 1:]
            if allowed(v, dim, align) and plan_bytes(trial, rows, dim) <= budget:
                dims[k] = v
                break
    return dims


def split_for_leftover(sizes, dims, rows, owners, probs, dim, budget, align):
    """Give the next allowed dim to as long a prefix (most frequent ids) of the first block that
    could still grow as the leftover pays for; the prefix becomes its own block (same owner)."""
    for k, cap in growable(dims, rows, sizes, probs, dim):
        v = next((v for v in range(dims[k] + 1, cap + 1) if allowed(v, dim, align)), None)
        if v is None or sizes[k] < 2:
            continue
        left = (budget - plan_bytes(dims, rows, dim)) / FP32_BYTES
        left -= v * dim if v < dim else 0  # the new block's projection
        prefix = min(sizes[k] - 1, int(left // (v - dims[k])))
        if prefix < 1:
            break
        cut = lambda xs, a, b: xs[:k] + [a, b] + xs[k + 1:]  # noqa: E731
        rest = sizes[k] - prefix
        return (cut(sizes, prefix, rest), cut(dims, v, dims[k]), cut(rows, prefix, rest),
                cut(owners, owners[k], owners[k]))
    return sizes, dims, rows, owners


class MixedDim(Method):
    name = "mixed_dim"

    def __init__(self, feature: FeatureSpec, dim: int, ends: list[int], dims: list[int],
                 rows: list[int] | None = None, init_std: float = 0.01, info: dict | None = None):
        super().__init__([feature], dim)
        if ends[-1] != feature.rows or sorted(set(ends)) != list(ends) or ends[0] < 1:
            raise ValueError(f"mixed_dim {feature.name!r}: block ends {ends} must rise to rows={feature.rows}")
        self.ends = list(ends)
        self.starts = [0] + self.ends[:-1]
        self.dims = [int(k) for k in dims]
        self.rows = list(rows) if rows is not None else self.sizes
        self.init_std = init_std
        self.info = dict(info or {})
        # Block boundaries are structure (like a table's shape), kept out of the state dict.
        self.register_buffer("_ends", torch.tensor(self.ends, dtype=torch.int64), persistent=False)
        # P_k ~ N(0, 1/d_k): with rows ~ N(0, init_std²) each output coordinate has std init_std.
        self.projections = nn.ParameterDict({
            str(k): nn.Parameter(torch.randn(d_k, dim) / math.sqrt(d_k))
            for k, d_k in enumerate(self.dims) if d_k != dim})

    @property
    def sizes(self) -> list[int]:
        """Ids per block (rows may be fewer where ids share rows)."""
        return [e - s for s, e in zip(self.starts, self.ends)]

    def table_name(self, k: int) -> str:
        return f"{self.features[0].name}/block{k}"

    def physical_tables(self) -> list[TableSpec]:
        return [TableSpec(self.table_name(k), r, d_k, init_std=self.init_std)
                for k, (r, d_k) in enumerate(zip(self.rows, self.dims))]

    def remap(self, ids: KeyedJaggedTensor) -> KeyedJaggedTensor:
        values, lengths, weights = ids.values().long(), ids.lengths(), ids.weights_or_none()
        names = [self.table_name(k) for k in range(len(self.dims))]
        if len(self.dims) == 1:
            return KeyedJaggedTensor(keys=names, values=self._fold(values, 0), lengths=lengths, weights=weights)
        block = torch.bucketize(values, self._ends, right=True)
        bag = torch.repeat_interleave(torch.arange(lengths.numel(), device=values.device), lengths)
        vals, lens, ws = [], [], []
        for k in range(len(self.dims)):  # one pass per block, never per id
            mask = block == k
            vals.append(self._fold(values[mask] - self.starts[k], k))
            lens.append(torch.bincount(bag[mask], minlength=lengths.numel()).to(lengths.dtype))
            if weights is not None:
                ws.append(weights[mask])
        return KeyedJaggedTensor(keys=names, values=torch.cat(vals), lengths=torch.cat(lens),
                                 weights=torch.cat(ws) if weights is not None else None)

    def _fold(self, local: torch.Tensor, k: int) -> torch.Tensor:
        """Block-local id → row; ids share rows only where the budget left fewer rows than ids."""
        size = self.ends[k] - self.starts[k]
        return local if self.rows[k] >= size else torch.remainder(local, self.rows[k])

    def combine(self, pooled: dict[str, torch.Tensor]) -> torch.Tensor:
        out = None
        for k in range(len(self.dims)):
            x = pooled[self.table_name(k)]
            y = x @ self.projections[str(k)] if str(k) in self.projections else x
            out = y if out is None else out + y
        return out.unsqueeze(1)

    def hyperparameters(self) -> dict:
        return {**self.info, "blocks": [{"start": s, "end": e, "rows": r, "dim": d_k} for s, e, r, d_k
                                        in zip(self.starts, self.ends, self.rows, self.dims)]}

    # --- solving ------------------------------------------------------------------------
    @classmethod
    def solve(cls, feature: FeatureSpec, dim: int, ratio: float, **options) -> "MixedDim":
        return cls.solve_group([feature], dim, ratio, **options)[0]

    @classmethod
    def solve_group(cls, features: list[FeatureSpec], dim: int, ratio: float, *, mode: str = "auto",
                    share_budget: bool = True, blocks: int = 4, alpha: float = 0.3, full_head: bool = True,
                    align: int = 1, fill: bool = True, min_dim: int = 1, boundaries: list[int] | None = None,
                    init_std: float = 0.01, round_dims: bool = False) -> list["MixedDim"]:
        """Options: mode auto|block|feature (auto: block mode while every id keeps its own row,
        feature mode once the budget makes ids share rows — there blocks only fragment the
        shared rows and add projections, and measured worse); share_budget (block mode: one λ
        over every feature's blocks; false: each feature meets the ratio alone); blocks
        (geometric count) or boundaries (explicit ends, one feature); alpha (temperature);
        full_head (block mode: each feature's most frequent block keeps d, the rule sizes the
        rest); align (round dims ≥ align to its multiples where the budget allows); fill (spend
        the rounding leftover on the most frequent blocks, and in block mode on a prefix of the
        next block, split off with one more dim); min_dim (below it a block shares rows instead
        of shrinking); mode reference: DLRM's md_solver (see the module doc), round_dims its
        power-of-2 rounding."""
        if mode not in ("auto", "block", "feature", "reference"):
            raise ValueError(f"mixed_dim mode must be 'auto', 'block', 'feature' or 'reference', got {mode!r}")
        if mode == "reference":
            return reference_plan(features, dim, ratio, alpha, round_dims, init_std)
        if boundaries and len(features) > 1:
            raise ValueError("mixed_dim boundaries are per feature; solve one feature at a time")
        opts = dict(alpha=alpha, full_head=full_head, align=align, fill=fill, min_dim=min_dim,
                    init_std=init_std)
        if mode != "feature" and not share_budget and len(features) > 1:
            return [cls.solve_group([f], dim, ratio, mode=mode, blocks=blocks, **opts)[0] for f in features]
        if mode == "auto":
            plan = cls.solve_group(features, dim, ratio, mode="block", blocks=blocks, boundaries=boundaries, **opts)
            if all(m.rows == m.sizes for m in plan):
                return plan
            return cls.solve_group(features, dim, ratio, mode="feature", **opts)
        if mode == "feature":
            ends = [[f.rows] for f in features]
        else:
            ends = [list(boundaries) if boundaries else geometric_ends(f.rows, blocks) for f in features]
        budget = sum(f.full_bytes(dim) for f in features) / ratio
        plan = _plan(features, ends, mode, dim, budget, **opts)
        if plan is None:  # nothing fits (tiny features, huge ratio): one shared row per feature
            plan = _plan(features, [[f.rows] for f in features], mode, dim, budget, **opts, strict=False)
        return plan


def _plan(features, ends, mode, dim, budget, *, alpha, full_head, align, fill, min_dim, init_std,
          strict=True):
    """Solve the power rule over every feature's blocks and build the methods (None if over budget)."""
    owners = [i for i, e in enumerate(ends) for _ in e]
    sizes = [int(x) for e in ends for x in np.diff([0, *e])]
    probs_of = [f.probabilities() for f in features] if mode == "block" else None
    probs = ([p for f_p, e in zip(probs_of, ends) for p in block_means(f_p, e)] if mode == "block"
             else [1.0 / f.rows for f in features])  # feature mode: uniform access within a feature
    # ids are in frequency order, so a feature's head block is its first
    heads = [owners.index(i) for i in range(len(features))] if mode == "block" and full_head else []
    lam, dims, rows = solve_plan(probs, sizes, heads, dim, budget, alpha, align, fill, min_dim)
    if strict and plan_bytes(dims, rows, dim) > budget and any(len(e) > 1 for e in ends):
        return None
    if fill and mode == "block":
        sizes, dims, rows, owners = split_for_leftover(sizes, dims, rows, owners, probs, dim, budget, align)
    methods = []
    for i, f in enumerate(features):
        mine = [k for k, o in enumerate(owners) if o == i]
        f_ends = np.cumsum([sizes[k] for k in mine]).tolist()
        info = {"mode": mode, "alpha": alpha, "lambda": lam, "group_budget_bytes": int(budget), "group_size": len(features)}
        if mode == "block":
            info["block_probability"] = block_means(probs_of[i], f_ends)
        methods.append(MixedDim(f, dim, f_ends, [dims[k] for k in mine], [rows[k] for k in mine],
                                init_std=init_std, info=info))
    return methods


def md_solver_dims(rows: list[int], alpha: float, base_dim: int, round_dims: bool = False) -> tuple[float, list[int]]:
    """(λ, dims) of DLRM's md_solver with base dim d: λ = d·n_min^α, dim = round(λ·n^-α) ≥ 1,
    the fewest-rows feature exactly d; round_dims: 2^round(log2 dim). Python's round, like
    torch.round there, takes halves to even."""
    smallest = min(rows)
    lam = base_dim * smallest ** alpha
    dims = [base_dim if n == smallest else max(1, round(lam * n ** -alpha)) for n in rows]
    if round_dims:
        dims = [2 ** round(math.log2(d)) for d in dims]
    return lam, dims


def reference_plan(features, dim, ratio, alpha, round_dims, init_std) -> list[MixedDim]:
    """One block per feature at md_solver's dims (reference mode)."""
    if ratio > 1:
        raise ConfigError(f"mixed_dim mode 'reference' sets dims from alpha and embedding.dim (DLRM's md_solver); "
                          f"leave out ratio ({ratio:g}), the achieved ratio is reported")
    lam, dims = md_solver_dims([f.rows for f in features], alpha, dim, round_dims)
    if max(dims) > dim:
        raise ConfigError(f"mixed_dim round_dims: embedding.dim {dim} is not a power of 2, so rounding makes dims "
                          f"{sorted(set(d for d in dims if d > dim))} above it; use a power of 2 or round_dims: false")
    info = {"mode": "reference", "alpha": alpha, "lambda": lam, "round_dims": round_dims}
    return [MixedDim(f, dim, [f.rows], [d], [f.rows], init_std=init_std, info=info) for f, d in zip(features, dims)]


def block_means(probs: np.ndarray, ends: list[int]) -> list[float]:
    """Mean access probability of each block of ids."""
    return [float(x.mean()) for x in np.split(probs, ends[:-1])]
