"""The group budget solve shared by hash, qr, binary_code and low_rank.

A method's smallest form (one hashed row, qr's 2√n rows, a rank-1 factor, …) can exceed a
tiny feature's own share of the budget, so the group's features meet ONE budget together and
the large ones compress a little harder to pay for the small ones.
"""
from __future__ import annotations

import math
from typing import Callable

from embtables.errors import ConfigError
from embtables.methods.base import Method
from embtables.specs import FeatureSpec


def solve_within_budget(fit: Callable[..., Method], features: list[FeatureSpec], dim: int,
                        ratio: float, **options) -> list[Method]:
    """Methods for `features` whose bytes together stay ≤ Σ full / ratio.

    `fit(feature, dim, r, **options)` must return the largest form within full / r, or the
    method's smallest form when nothing fits; its bytes never grow with r. Every feature is
    first fitted at `ratio`; when the small ones' floors overshoot, one common ratio r ≥ ratio
    is raised (bisection) until the sum fits. No form fits → ConfigError with the reachable ratio.
    What rounding leaves of the budget then goes to the largest features.
    """
    full = sum(f.full_bytes(dim) for f in features)
    budget = full / ratio

    def attempt(r: float) -> tuple[list[Method], int]:
        methods = [fit(f, dim, r, **options) for f in features]
        return methods, sum(m.embedding_bytes() for m in methods)

    methods, used = attempt(ratio)
    if used > budget:
        methods = _common_ratio(attempt, features, ratio, full, budget)
    return _spend_leftover(fit, methods, features, dim, budget, options)


def _common_ratio(attempt, features, ratio, full, budget) -> list[Method]:
    """The least common ratio r ≥ ratio at which every feature's fit together meets the budget."""
    smallest, floor_bytes = attempt(math.inf)
    if floor_bytes > budget:
        shown = sorted(features, key=lambda f: -f.rows)[:4]
        names = ", ".join(f"{f.name!r} ({f.rows} rows)" for f in shown)
        if len(features) > len(shown):
            names = f"{len(features)} features ({names}, …)"
        raise ConfigError(f"compression ratio {ratio:g} is out of reach for method {smallest[0].name!r} on "
                          f"{names}: its smallest form takes {floor_bytes} bytes > budget {budget:.0f} "
                          f"(the most it can reach here is {full / floor_bytes:.4g}×); lower the ratio "
                          f"or leave these features uncompressed")
    lo, hi, best = ratio, ratio * 2, None
    while best is None:  # grow until it fits (at the latest when every fit is at its floor)
        candidate, used = attempt(hi)
        if used <= budget:
            best = candidate
        elif hi > 1e15:
            best = smallest
        else:
            lo, hi = hi, hi * 2
    for _ in range(40):  # geometric bisection: the least compression that fits
        mid = math.sqrt(lo * hi)
        candidate, used = attempt(mid)
        if used <= budget:
            hi, best = mid, candidate
        else:
            lo = mid
    return best


def _spend_leftover(fit, methods, features, dim, budget, options) -> list[Method]:
    """Give what rounding left of the budget to the features, largest first (each fit is coarse:
    whole rows, integer collisions, whole bits), by lowering that feature's own ratio."""
    methods = list(methods)
    used = sum(m.embedding_bytes() for m in methods)
    for i in sorted(range(len(features)), key=lambda i: -features[i].full_bytes(dim)):
        room = budget - used + methods[i].embedding_bytes()
        lo, hi = 1.0, features[i].full_bytes(dim) / max(methods[i].embedding_bytes(), 1)
        if hi <= lo:
            continue
        for _ in range(30):  # the least ratio for this feature that stays within the room left
            mid = math.sqrt(lo * hi)
            candidate = fit(features[i], dim, mid, **options)
            if candidate.embedding_bytes() <= room:
                hi = mid
                if candidate.embedding_bytes() > methods[i].embedding_bytes():
                    used += candidate.embedding_bytes() - methods[i].embedding_bytes()
                    methods[i] = candidate
                    room = budget - used + methods[i].embedding_bytes()
            else:
                lo = mid
    return methods
