"""qr: quotient–remainder compositional embeddings (Shi et al. 2020).

Two tables, Q with ⌈n/c⌉ rows and R with c rows; id ↦ (id // c, id % c) is a bijection onto
pairs, so no two ids share a representation: emb = Q[id // c] ∘ R[id % c], ∘ ∈ {mult, add,
concat}. Pooling sums each table over the bag before ∘, so for a multi-hot bag `mult` gives
(ΣQ)∘(ΣR), as DLRM's QR embedding bag does; add and concat are exact.

`frequency_aware` (ids are in descending frequency order) swaps which index the big table
takes: Q[id % ⌈n/c⌉] ∘ R[id // ⌈n/c⌉]. The ⌈n/c⌉ most frequent ids then each get a Q row of
their own and share only R[0]; the pairs stay unique.

Weights: DLRM's QREmbeddingBag passes a bag's per-sample weights to both bags, so under `mult`
a single id of weight w gives w²·(Q∘R), and a bag gives (Σ w·Q)∘(Σ w·R). Ours weights Q only
(w·(Q∘R) for one id, what a weighted sum of embeddings means); `weight_both: true` is the
reference's. add and concat weight both bags either way (each is then linear in w).

The reference's own form (dlrm_s_pytorch `--qr-flag`): a fixed `collisions` c (its
`--qr-collisions`, default 4) for every table above `threshold` rows (its `--qr-threshold`,
default 200; smaller features keep a full table), quotient layout (`frequency_aware: false`:
Q[id // c], R[id % c], Q with ⌈n/c⌉ rows, R with c), `weight_both: true`. Fixed collisions set
the sizes, so `ratio` is left out there (the achieved ratio is reported).

Reach: Q and R together hold at least ≈ 2√n rows, so `mult`/`add` cannot compress a feature
more than ≈ √n/2 (`concat`, with half-width rows, ≈ √n). Out of reach, the group solve makes
the other features pay (see `solve_within_budget`) or raises a ConfigError saying how far qr
can go — it never drops the unique-pair guarantee.
"""
from __future__ import annotations

import math

import torch
from torchrec import KeyedJaggedTensor

from embtables.errors import ConfigError
from embtables.methods.base import Method
from embtables.methods.budget import solve_within_budget
from embtables.methods.full import Full
from embtables.specs import CONCAT, DIV, MOD, MULT, SUM, FeatureSpec, FusedFeature, FusedPart, TableSpec

OPS = ("mult", "add", "concat")


class QuotientRemainder(Method):
    name = "qr"

    def __init__(self, feature: FeatureSpec, dim: int, collisions: int, op: str = "mult",
                 frequency_aware: bool = True, init_std: float = 0.01, weight_both: bool = False):
        super().__init__([feature], dim)
        if op not in OPS:
            raise ValueError(f"qr: op must be one of {OPS}, got {op!r}")
        if op == "concat" and dim < 2:
            raise ValueError("qr: op 'concat' needs dim >= 2")
        self.op = op
        self.frequency_aware = frequency_aware
        self.weight_both = weight_both
        self.init_std = init_std
        self.c = int(collisions)  # R's rows: how many ids share each Q row
        self.q_rows = math.ceil(feature.rows / self.c)
        # Frequency-aware R is indexed by id // q_rows, which may need fewer than c rows.
        self.r_rows = math.ceil(feature.rows / self.q_rows) if frequency_aware else self.c
        self.q_dim, self.r_dim = part_dims(dim, op)

    @property
    def q_name(self) -> str:
        return f"{self.features[0].name}/qr_q"

    @property
    def r_name(self) -> str:
        return f"{self.features[0].name}/qr_r"

    def physical_tables(self) -> list[TableSpec]:
        if self.op == "mult":
            std = math.sqrt(self.init_std)  # product of two N(0, s) has std s² = init_std
        elif self.op == "add":
            std = self.init_std / math.sqrt(2)  # sum of two keeps init_std
        else:
            std = self.init_std
        return [TableSpec(self.q_name, self.q_rows, self.q_dim, init_std=std),
                TableSpec(self.r_name, self.r_rows, self.r_dim, init_std=std)]

    def pair(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q row, R row) of each id."""
        ids = ids.long()
        if self.frequency_aware:
            return ids % self.q_rows, ids // self.q_rows
        return ids // self.c, ids % self.c

    def fused_parts(self) -> list[FusedFeature]:
        q_kind, r_kind, a = (MOD, DIV, self.q_rows) if self.frequency_aware else (DIV, MOD, self.c)  # as pair()
        q = FusedPart(q_kind, self.q_name, a=a)
        r = FusedPart(r_kind, self.r_name, a=a, col=self.q_dim if self.op == "concat" else 0,
                      weighted=self.op != "mult" or self.weight_both)  # as remap's weights
        return [FusedFeature((q, r), {"mult": MULT, "add": SUM, "concat": CONCAT}[self.op])]

    def remap(self, ids: KeyedJaggedTensor) -> KeyedJaggedTensor:
        q, r = self.pair(ids.values())
        lengths = ids.lengths()
        weights = ids.weights_or_none()
        if weights is not None:
            # mult: weight one factor only, so a single-id bag gives w·(Q∘R), not w²·(Q∘R)
            # (unless weight_both: the reference's (Σ w·Q)∘(Σ w·R)).
            r_weights = torch.ones_like(weights) if self.op == "mult" and not self.weight_both else weights
            weights = torch.cat([weights, r_weights])
        return KeyedJaggedTensor(keys=[self.q_name, self.r_name], values=torch.cat([q, r]),
                                 lengths=torch.cat([lengths, lengths]), weights=weights)

    def combine(self, pooled: dict[str, torch.Tensor]) -> torch.Tensor:
        q, r = pooled[self.q_name], pooled[self.r_name]
        if self.op == "mult":
            out = q * r
        elif self.op == "add":
            out = q + r
        else:
            out = torch.cat([q, r], dim=1)
        return out.unsqueeze(1)

    def hyperparameters(self) -> dict:
        return {"collisions": self.c, "q_rows": self.q_rows, "r_rows": self.r_rows, "op": self.op,
                "frequency_aware": self.frequency_aware, "weight_both": self.weight_both,
                "achieved_ratio": round(self.full_bytes() / self.embedding_bytes(), 3)}

    # --- solving ------------------------------------------------------------------------
    @classmethod
    def fit(cls, feature: FeatureSpec, dim: int, ratio: float, op: str = "mult",
            frequency_aware: bool = True, init_std: float = 0.01, weight_both: bool = False) -> "QuotientRemainder":
        """The fewest collisions c (largest Q) within full / ratio; the smallest form if none fits."""
        n = feature.rows
        a, b = part_dims(dim, op)
        budget = n * dim / ratio  # in floats
        cost = lambda c: math.ceil(n / c) * a + c * b  # noqa: E731
        # a·n/c + b·c ≤ budget  ⇔  b·c² − budget·c + a·n ≤ 0: c at the quadratic's smaller root.
        disc = budget * budget - 4 * a * b * n
        mid = max(1, round(math.sqrt(a * n / b)))  # where cost is least
        c_best = None
        if disc >= 0:  # usually the first c tried fits; the scan is long only at the edge of reach
            start = max(1, math.floor((budget - math.sqrt(disc)) / (2 * b)) - 2)
            c_best = next((c for c in range(start, min(n, max(start, mid) + 3) + 1) if cost(c) <= budget), None)
        if c_best is None:  # out of reach: the smallest form
            c_best = min(range(max(1, mid - 3), min(n, mid + 3) + 1), key=lambda c: (cost(c), c))
        return cls(feature, dim, c_best, op=op, frequency_aware=frequency_aware, init_std=init_std,
                   weight_both=weight_both)

    @classmethod
    def solve(cls, feature: FeatureSpec, dim: int, ratio: float, **options) -> Method:
        return cls.solve_group([feature], dim, ratio, **options)[0]

    @classmethod
    def solve_group(cls, features: list[FeatureSpec], dim: int, ratio: float, op: str = "mult",
                    frequency_aware: bool = True, init_std: float = 0.01, weight_both: bool = False,
                    collisions: int | None = None, threshold: int = 0) -> list[Method]:
        """`collisions` fixes c for every feature (the reference's sizing; no ratio then) and
        features of at most `threshold` rows keep a full table (only with `collisions`)."""
        options = dict(op=op, frequency_aware=frequency_aware, init_std=init_std, weight_both=weight_both)
        if collisions is None:
            if threshold:
                raise ConfigError("embedding.compression.threshold: only with a fixed `collisions` (the "
                                  "reference's sizing); with a ratio, small features are kept full already")
            return solve_within_budget(cls.fit, features, dim, ratio, **options)
        if ratio > 1:
            raise ConfigError(f"embedding.compression.collisions ({collisions}) fixes the qr table sizes; leave "
                              f"out ratio ({ratio:g}), the achieved ratio is reported")
        if int(collisions) < 1:
            raise ConfigError(f"embedding.compression.collisions must be >= 1, got {collisions}")
        return [Full(f, dim, init_std=init_std) if f.rows <= threshold else cls(f, dim, int(collisions), **options)
                for f in features]


def part_dims(dim: int, op: str) -> tuple[int, int]:
    """Widths of Q and R rows: the full dim, or halves for concat."""
    return (dim - dim // 2, dim // 2) if op == "concat" else (dim, dim)
