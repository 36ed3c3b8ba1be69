"""The export format: file names, version, checksums — what writers and readers of an export share."""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path

import torch

EXPORT_FORMAT = "embtables-export"
EXPORT_VERSION = 3  # 2: one tensor per table / method tensor; encoded method tensors; 3: manifest digest
MANIFEST = "manifest.json"
MANIFEST_DIGEST = "manifest_sha256"
EMBEDDINGS_FILE = "embeddings.safetensors"
DENSE_FILE = "dense.safetensors"


def embtables_version() -> str:
    try:
        return importlib.metadata.version("embtables")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"  # running from a source tree that is not installed


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes (C order, native little-endian)."""
    return hashlib.sha256(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, no spaces) without the digest itself,
    so reformatting the file keeps it valid and editing any entry does not."""
    body = {k: v for k, v in manifest.items() if k != MANIFEST_DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def is_export(path: Path) -> bool:
    try:
        return json.loads((Path(path) / MANIFEST).read_text()).get("format") == EXPORT_FORMAT
    except (OSError, ValueError):
        return False
