"""One fast, vectorised, salted 64-bit integer hash shared by every hashing-based method.

The mixer is splitmix64's finaliser (Steele et al.), written with torch int64 ops. torch's
int64 multiply wraps modulo 2^64 like an unsigned one would, but `>>` on a negative int64 is
arithmetic (it copies the sign bit), so every right shift is masked to make it logical.
"""
from __future__ import annotations

import hashlib

import torch

_MASK64 = (1 << 64) - 1
_MASK63 = (1 << 63) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # 2^64 / φ, odd: multiplying by it is a bijection mod 2^64
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def _signed(x: int) -> int:
    """The int64 with the same 64 bits as the unsigned value x."""
    x &= _MASK64
    return x - (1 << 64) if x >> 63 else x


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser: a bijection on 64-bit words with full avalanche."""
    z = (z ^ _shr(z, 30)) * _signed(_MIX1)
    z = (z ^ _shr(z, 27)) * _signed(_MIX2)
    return z ^ _shr(z, 31)


def mix64_int(x: int) -> int:
    """The same finaliser on a Python int (unsigned 64-bit), for salts and for tests."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * _MIX1) & _MASK64
    x = ((x ^ (x >> 27)) * _MIX2) & _MASK64
    return x ^ (x >> 31)


def salt_of(*parts: object) -> int:
    """A stable 63-bit salt from names (feature, chunk, …); the same on every machine and run."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK63


def salted_hash(ids: torch.Tensor, salt: int | torch.Tensor) -> torch.Tensor:
    """Non-negative 63-bit hashes of int ids; a different salt gives an unrelated function.

    h(x) = mix64(x·φ + mix64(salt)) with the top bit dropped. `salt` is one int, or an int64
    tensor with one salt per id (many features hashed in one call). Reduce with `% m`
    afterwards: with 63 bits the modulo bias is below m / 2^63.
    """
    salted = mix64(salt.long()) if isinstance(salt, torch.Tensor) else _signed(mix64_int(salt))
    return mix64(ids.long() * _signed(_GOLDEN) + salted) & _MASK63


def salted_hash_int(x: int, salt: int) -> int:
    """Reference of `salted_hash` for one id in plain Python integers (tests check them equal)."""
    return mix64_int(x * _GOLDEN + mix64_int(salt)) & _MASK63


def hashed_rows(ids: torch.Tensor, salt: int | torch.Tensor, rows: int) -> torch.Tensor:
    """Rows in [0, rows) for each id."""
    return salted_hash(ids, salt) % rows
