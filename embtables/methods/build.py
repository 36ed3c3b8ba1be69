"""Choose and solve the compression method of every feature from the config."""
from __future__ import annotations

import inspect

from embtables.errors import ConfigError
from embtables.methods import method_class
from embtables.methods.base import Method
from embtables.specs import FeatureSpec

# Share of a group's byte budget that small features may keep as full tables.
SMALL_FEATURE_SHARE = 0.1


def feature_compression(cfg_embedding: dict, name: str) -> dict:
    """The global compression mapping with this feature's override laid over it."""
    spec = {k: v for k, v in cfg_embedding["compression"].items()}
    override = cfg_embedding["features"].get(name, {}).get("compression")
    if override:
        if "method" in override and override["method"] != spec.get("method"):
            spec = {"ratio": spec.get("ratio", 1.0)}  # other method: drop the global one's options
        spec.update(override)
    return spec


def build_methods(features: list[FeatureSpec], cfg_embedding: dict) -> list[Method]:
    """One solve per (method, ratio, options) group, in feature order of first appearance."""
    dim = cfg_embedding["dim"]
    groups: dict[str, tuple[dict, list[FeatureSpec]]] = {}
    for f in features:
        spec = feature_compression(cfg_embedding, f.name)
        key = repr(sorted(spec.items()))
        groups.setdefault(key, (spec, []))[1].append(f)
    methods: list[Method] = []
    for spec, group in groups.values():
        options = dict(spec)
        name = options.pop("method", "full")
        ratio = float(options.pop("ratio", 1.0))
        cls = method_class(name)
        if name == "full":
            options.setdefault("init_std", cfg_embedding["init_std"])
        _check_options(cls, name, options)
        if name == "full" or ratio <= 1.0:
            methods.extend(cls.solve_group(group, dim, ratio, **options))
            continue
        small, large, large_ratio = split_small_features(group, dim, ratio)
        methods.extend(method_class("full").solve(f, dim, init_std=cfg_embedding["init_std"]) for f in small)
        if large:
            methods.extend(cls.solve_group(large, dim, large_ratio, **options))
    return methods


def split_small_features(features: list[FeatureSpec], dim: int, ratio: float,
                         share: float = SMALL_FEATURE_SHARE):
    """Keep the smallest features uncompressed while they fit in `share` of the budget.

    Compressing a 7-row weekday table saves nothing worth its damage; the budget it keeps is
    taken from the large features, whose ratio rises to keep Σ bytes ≤ full / ratio.
    Returns (small, large, ratio the large ones must meet).
    """
    budget = sum(f.full_bytes(dim) for f in features) / ratio
    small, used = [], 0
    for f in sorted(features, key=lambda f: f.full_bytes(dim)):
        if used + f.full_bytes(dim) > share * budget:
            break
        small.append(f)
        used += f.full_bytes(dim)
    large = [f for f in features if f not in small]
    if not large:
        return small, [], ratio
    large_full = sum(f.full_bytes(dim) for f in large)
    return small, large, large_full / (budget - used)


def _check_options(cls, name: str, options: dict) -> None:
    """Unknown method options are config errors, not silently ignored keywords."""
    known = set()
    for fn in (cls.solve, cls.solve_group, getattr(cls, "fit", cls.solve)):  # fit: where solve passes **options
        known |= {p.name for p in inspect.signature(fn).parameters.values()
                  if p.kind is p.KEYWORD_ONLY or (p.kind is p.POSITIONAL_OR_KEYWORD and p.default is not p.empty)}
    known -= {"ratio"}
    for key in options:
        if key not in known:
            raise ConfigError(f"embedding.compression.{key}: not an option of method {name!r}"
                              f" (its options: {', '.join(sorted(known)) or 'none'})")
