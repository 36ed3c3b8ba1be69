"""sha256 of files, streamed: what checkpoints, exports and dataset fingerprints all record."""
from __future__ import annotations

import hashlib
from pathlib import Path


def hash_file_into(h, path: Path) -> None:
    """Feed `path`'s bytes to the hash object `h`, 1 MiB at a time."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    hash_file_into(h, path)
    return h.hexdigest()
