"""The hash functions of the whole package: a salted 64-bit integer hash for the hashing-based
methods (torch, vectorised) and splitmix64 on numpy words for seeded row splits.

The mixer is splitmix64's finaliser (Steele et al.), written once (`_finalise`) for torch int64,
numpy uint64 and Python ints; the Triton kernels hold the device copy (kernels/triton/kernels.py).
torch's int64 multiply wraps modulo 2^64 like an unsigned one would, but `>>` on a negative int64
is arithmetic (it copies the sign bit), so every torch right shift is masked to make it logical.
torch itself is never imported here: the ingest uses the numpy half, and importing torch would
cost it ~2.5 CPU seconds and ~0.5 GB.
"""
from __future__ import annotations

import hashlib

import numpy as np

_MASK64 = (1 << 64) - 1
_MASK63 = (1 << 63) - 1
GOLDEN = 0x9E3779B97F4A7C15  # 2^64 / φ, odd: multiplying by it is a bijection mod 2^64
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def signed64(x: int) -> int:
    """The int64 with the same 64 bits as the unsigned value x."""
    x &= _MASK64
    return x - (1 << 64) if x >> 63 else x


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _finalise(z, shr, m1, m2):
    """splitmix64's finaliser: a bijection on 64-bit words with full avalanche."""
    z = (z ^ shr(z, 30)) * m1
    z = (z ^ shr(z, 27)) * m2
    return z ^ shr(z, 31)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """The finaliser on int64 tensors (as 64-bit words)."""
    return _finalise(z, _shr, signed64(_MIX1), signed64(_MIX2))


def mix64_array(z: np.ndarray) -> np.ndarray:
    """The finaliser on uint64 arrays (wrapping)."""
    with np.errstate(over="ignore"):
        return _finalise(np.asarray(z, dtype=np.uint64), lambda v, k: v >> np.uint64(k),
                         np.uint64(_MIX1), np.uint64(_MIX2))


def mix64_int(x: int) -> int:
    """The finaliser on a Python int (unsigned 64-bit), for salts and for tests."""
    return int(mix64_array(np.uint64(x & _MASK64)))


def salt_of(*parts: object) -> int:
    """A stable 63-bit salt from names (feature, chunk, …); the same on every machine and run."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK63


def mixed_salt(salt: int) -> int:
    """mix64(salt) as an int64: what salted_hash adds to id·φ (the Triton kernels take it)."""
    return signed64(mix64_int(salt))


def salted_hash(ids: torch.Tensor, salt: int | torch.Tensor) -> torch.Tensor:
    """Non-negative 63-bit hashes of int ids; a different salt gives an unrelated function.

    h(x) = mix64(x·φ + mix64(salt)) with the top bit dropped. `salt` is one int, or an int64
    tensor with one salt per id (many features hashed in one call). Reduce with `% m`
    afterwards: with 63 bits the modulo bias is below m / 2^63.
    """
    salted = mixed_salt(int(salt)) if isinstance(salt, (int, np.integer)) else mix64(salt.long())
    return mix64(ids.long() * signed64(GOLDEN) + salted) & _MASK63


def hashed_rows(ids: torch.Tensor, salt: int | torch.Tensor, rows: int) -> torch.Tensor:
    """Rows in [0, rows) for each id."""
    return salted_hash(ids, salt) % rows


def uniform_of(words: np.ndarray) -> np.ndarray:
    """uint64 hashes → floats uniform in [0, 1) (their top 53 bits), for seeded splits."""
    return (words >> np.uint64(11)).astype(np.float64) / float(1 << 53)
