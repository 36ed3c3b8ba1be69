"""Give training an encoded dataset: use it as is, or encode plain Parquet once into a cache."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from embtables.errors import ConfigError
from embtables.pipelines.data.parquet_io import expand_paths, is_encoded_dataset
from embtables.pipelines.data.encode import VERSION, load_stats, prepare_parquet


def cache_root() -> Path:
    return Path(os.environ.get("EMBTABLES_CACHE") or Path.home() / ".cache" / "embtables")


def encoded_dataset_of(path) -> Path | None:
    """The encoded dataset `path` is (or is inside: a split dir or part file), else None."""
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    p = Path(path)
    for candidate in (p, p.parent, p.parent.parent):
        if candidate.is_dir() and is_encoded_dataset(candidate):
            return candidate
    return None


def ensure_encoded(train, valid, label: str | None, dense, sparse, min_count: int = 1) -> Path:
    """Path of an encoded dataset for these inputs.

    If `train` is (inside) an encoded dataset, that dataset is returned (its own valid split
    is used; `valid` is ignored) after checking the requested columns exist. Otherwise the
    Parquet inputs are encoded into `$EMBTABLES_CACHE` (default ~/.cache/embtables), keyed by
    the files' paths, sizes and mtimes and the options, and reused while nothing changes.
    `label=None`: the encoded dataset's own label (plain Parquet: the column "label").
    """
    dense, sparse = list(dense or []), list(sparse or [])
    existing = encoded_dataset_of(train)
    if existing is not None:
        _check_columns(existing, label, dense, sparse)
        return existing

    label = label or "label"
    train_files = expand_paths(train)
    valid_files = expand_paths(valid) if valid is not None else None
    key = {
        "version": VERSION,
        "train": [_fingerprint(p) for p in train_files],
        "valid": [_fingerprint(p) for p in valid_files] if valid_files else None,
        "label": label, "dense": dense, "sparse": sparse, "min_count": min_count,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    out = cache_root() / f"encoded-{digest}"
    if is_encoded_dataset(out):
        return out
    # keep_existing: if a concurrent job finished the same cache entry first, use theirs.
    return prepare_parquet(train_files, valid_files, label=label, dense=dense, sparse=sparse, out=out,
                           min_count=min_count, keep_existing=True)


def _fingerprint(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def _check_columns(dataset: Path, label: str, dense: list[str], sparse: list[str]) -> None:
    """Requested columns must exist; batches always carry every feature of the dataset."""
    stats = load_stats(dataset)
    if label and label != stats["label"]:
        raise ConfigError(f"data.label is {label!r} but {dataset} was encoded with label {stats['label']!r}")
    for role, asked in (("dense", dense), ("sparse", sparse)):
        missing = [c for c in asked if c not in stats[role]]
        if missing:
            raise ConfigError(f"data.{role}: {', '.join(missing)} not in {dataset}; it has: "
                              f"{', '.join(stats[role]) or '(none)'}")
