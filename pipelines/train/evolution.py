"""Evolutionary search over per-field embedding dims (OptEmbed's second stage).

Pure and deterministic under a seed: all randomness comes from one numpy Generator, candidates
are immutable tuples (a scored candidate is never changed; children are new tuples), each
candidate is scored once (memoised), and ranking ties break on cost, then on the tuple itself.

Differences from the reference code, on purpose: crossover picks each FIELD's dim from one of
the two parents (the reference drew its crossover point over the dim range, not the fields);
mutation always changes at least one field; a byte budget is enforced by a seeded repair that
lowers dims until the candidate fits, so every scored candidate is feasible when any is.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

Candidate = tuple[int, ...]


@dataclass
class SearchResult:
    best: Candidate
    fitness: float
    cost: float
    feasible: bool                      # best fits the budget (False only when nothing can)
    evaluations: int
    history: list[dict] = field(default_factory=list)  # per iteration: best and mean fitness of parents


def repair(c: Candidate, cost: Callable[[Candidate], float], budget: float, rng: np.random.Generator,
           min_dim: int = 1) -> Candidate:
    """Lower dims one at a time until cost ≤ budget; fields are drawn with weight = bytes one dim saves."""
    dims = list(c)
    while cost(tuple(dims)) > budget:
        here = cost(tuple(dims))
        saving = np.array([here - cost(tuple(dims[:i] + [d - 1] + dims[i + 1:])) if d > min_dim else 0.0
                           for i, d in enumerate(dims)], dtype=np.float64)
        if saving.sum() <= 0:
            break  # every dim at its minimum: the budget cannot be met
        i = int(rng.choice(len(dims), p=saving / saving.sum()))
        dims[i] -= 1
    return tuple(dims)


def mutate(c: Candidate, max_dims: Candidate, p: float, rng: np.random.Generator) -> Candidate:
    """Each field redraws its dim from U{1..max} (≠ current) with probability p; at least one does."""
    flips = rng.random(len(c)) < p
    changeable = [i for i, m in enumerate(max_dims) if m > 1]
    if not changeable:
        return c
    if not flips[changeable].any():
        flips[changeable[int(rng.integers(len(changeable)))]] = True
    out = list(c)
    for i in np.flatnonzero(flips):
        if max_dims[i] > 1:
            d = int(rng.integers(1, max_dims[i]))  # 1..max-1, shifted past the current value
            out[i] = d + 1 if d >= c[i] else d
    return tuple(out)


def crossover(a: Candidate, b: Candidate, rng: np.random.Generator) -> Candidate:
    """Uniform crossover over fields: each field's dim comes from a or b."""
    take_b = rng.random(len(a)) < 0.5
    return tuple(int(y) if t else int(x) for x, y, t in zip(a, b, take_b))


def evolve(max_dims: Candidate, fitness: Callable[[Candidate], float], *, seed: int,
           cost: Callable[[Candidate], float] | None = None, budget: float = float("inf"),
           iterations: int = 30, population: int = 20, mutations: int = 10, crossovers: int = 10,
           keep: int = 15, p_mutation: float = 0.1, log: Callable[[str], None] | None = None) -> SearchResult:
    """Maximise fitness(dims) over dims_f ∈ [1, max_dims_f], subject to cost(dims) ≤ budget."""
    rng = np.random.default_rng(seed)
    cost = cost or (lambda c: float(sum(c)))
    scores: dict[Candidate, float] = {}

    def admit(c: Candidate) -> Candidate:
        c = repair(tuple(int(x) for x in c), cost, budget, rng)
        if c not in scores:
            scores[c] = float(fitness(c))
        return c

    def ranked(cands) -> list[Candidate]:
        return sorted(set(cands), key=lambda c: (-scores[c], cost(c), c))

    # The start: the widest candidate (repaired to the budget) and random ones.
    pool = [admit(max_dims)]
    for _ in range(population - 1):
        pool.append(admit(tuple(int(rng.integers(1, m + 1)) for m in max_dims)))
    parents = ranked(pool)[:keep]
    history = []
    for it in range(iterations):
        children = []
        for _ in range(mutations):
            children.append(admit(mutate(parents[int(rng.integers(len(parents)))], max_dims, p_mutation, rng)))
        for _ in range(crossovers):
            i, j = rng.choice(len(parents), size=2, replace=len(parents) < 2)
            children.append(admit(crossover(parents[int(i)], parents[int(j)], rng)))
        parents = ranked(parents + children)[:keep]
        top = [scores[c] for c in parents]
        history.append({"iteration": it + 1, "best": top[0], "mean": float(np.mean(top)), "evaluated": len(scores)})
        if log:
            log(f"search {it + 1}/{iterations}: best {top[0]:.5f}  mean of top {len(top)} {np.mean(top):.5f}  "
                f"dims {list(parents[0])}")
    best = parents[0]
    return SearchResult(best=best, fitness=scores[best], cost=cost(best), feasible=cost(best) <= budget,
                        evaluations=len(scores), history=history)
