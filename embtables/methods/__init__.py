"""Compression methods, one file each, all behind the contract in `base.py`."""
from __future__ import annotations

import importlib

from embtables.errors import ConfigError
from embtables.methods.base import Method

# method name → "module:Class"; imported on first use.
REGISTRY = {
    "full": "embtables.methods.full:Full",
    "hash": "embtables.methods.hashing:Hash",
    "qr": "embtables.methods.qr:QuotientRemainder",
    "binary_code": "embtables.methods.binary_code:BinaryCode",
    "multiplexed": "embtables.methods.multiplexed:Multiplexed",
    "mixed_dim": "embtables.methods.mixed_dim:MixedDim",
    "low_rank": "embtables.methods.low_rank:LowRank",
    "optembed": "embtables.methods.optembed:OptEmbed",
}


def method_class(name: str) -> type[Method]:
    if name not in REGISTRY:
        raise ConfigError(f"unknown compression method {name!r}; available: {', '.join(sorted(REGISTRY))}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["Method", "REGISTRY", "method_class"]
