"""What a job is bound to: a dataset's fingerprint, its vocabularies, and the lock of its readers.

- The fingerprint (sha256 over stats.json and every file's content, computed once at ingest and
  stored in stats.json) names one exact encoded dataset. A run records it when it starts;
  training checks it at every epoch start, and resume/eval refuse another one, naming both.
- The vocabulary digest of a feature (sha256 of its values in id order) says what its ids mean:
  data scored by a model must share the model's, or every id points at another value's row.
- A job that reads a dataset holds a shared lock on its directory (`reading_dataset`); ingest
  takes the exclusive lock only to swap a new version in (`no_readers`), and refuses while a
  reader holds it, so a running training never has its data switched under it.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embtables.checksums import hash_file_into
from embtables.errors import DataError


# ---------------------------------------------------------------- fingerprints

def content_fingerprint(dataset: Path, stats: dict) -> str:
    """sha256 over the stats (without the fingerprint itself) and every data and vocab file."""
    h = hashlib.sha256(json.dumps({k: v for k, v in stats.items() if k != "fingerprint"},
                                  sort_keys=True).encode())
    files = sorted(p for p in Path(dataset).rglob("*.parquet") if p.is_file())
    for p in files:
        h.update(p.relative_to(dataset).as_posix().encode() + b"\0")
        hash_file_into(h, p)
    return h.hexdigest()


def dataset_fingerprint(path) -> str:
    """The fingerprint of the encoded dataset at `path`: stored at ingest.

    Datasets from before fingerprints get one from stats.json and each file's name, size and
    mtime (cheap, as it is checked every epoch; any re-ingest rewrites every file).
    """
    from embtables.pipelines.data.encode import load_stats

    path = Path(path)
    stats = load_stats(path)
    if stats.get("fingerprint"):
        return stats["fingerprint"]
    h = hashlib.sha256((path / "stats.json").read_bytes())
    for p in sorted(path.rglob("*.parquet")):
        st = p.stat()
        h.update(f"{p.relative_to(path).as_posix()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def check_fingerprint(path, expected: str | None, what: str = "the run") -> None:
    """DataError naming both fingerprints when the dataset at `path` is not the one `what` recorded.

    `expected=None` (a run from before fingerprints were recorded) checks nothing.
    """
    if expected is None:
        return
    found = dataset_fingerprint(path)
    if found != expected:
        raise DataError(f"{path}: dataset fingerprint {found[:16]} differs from {expected[:16]} that {what} "
                        f"recorded; the dataset was re-ingested or replaced since. Train a new run on it "
                        f"(or restore the dataset the run used)")


# ---------------------------------------------------------------- vocabularies

def vocabulary_digest(values: pa.Array | pa.ChunkedArray) -> str:
    """sha256 of a vocabulary's values in id order (ints as int64, strings length-prefixed)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    h = hashlib.sha256()
    if pa.types.is_integer(values.type):
        h.update(b"int64\0" + values.cast(pa.int64()).to_numpy(zero_copy_only=False).tobytes())
    else:
        values = values.cast(pa.large_string())
        _, offsets_buf, data = values.buffers()
        offsets = np.frombuffer(offsets_buf, dtype=np.int64)[values.offset: values.offset + len(values) + 1]
        h.update(b"string\0" + (offsets - offsets[0]).astype("<i8").tobytes())
        if len(values):
            h.update(memoryview(data)[offsets[0]:offsets[-1]])
    return h.hexdigest()


def vocab_file_digest(path: Path | None) -> str:
    """The vocabulary digest of a vocab Parquet file (None: an empty vocabulary)."""
    if path is None:
        return vocabulary_digest(pa.array([], pa.int64()))
    try:
        return vocabulary_digest(pq.read_table(path, columns=["value"])["value"])
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: unreadable vocabulary: {e}") from None


def dataset_vocabularies(dataset) -> dict[str, str]:
    """Feature name → vocabulary digest of an encoded dataset (stored at ingest; else computed)."""
    from embtables.pipelines.data.encode import load_stats

    dataset = Path(dataset)
    stats = load_stats(dataset)
    out = {}
    for name in stats["sparse"]:
        meta = stats["features"][name]
        out[name] = meta.get("vocab_sha256") or vocab_file_digest(
            dataset / "vocab" / f"{name}.parquet" if meta["vocab_size"] else None)
    return out


def check_same_vocabulary(data, expected: dict[str, str], reference: str) -> None:
    """DataError unless the encoded dataset `data` encodes every feature of `expected` the same way.

    `expected` maps feature → vocabulary digest of the model's data (`reference` names it).
    Ids of data encoded with another vocabulary mean other values, so scoring them is wrong.
    """
    theirs = dataset_vocabularies(data)
    missing = [n for n in expected if n not in theirs]
    if missing:
        raise DataError(f"{data} is not encoded like {reference}: it lacks the features "
                        f"{', '.join(missing[:5])}; it has {', '.join(list(theirs)[:8]) or 'none'}")
    for name, digest in expected.items():
        if theirs[name] != digest:
            raise DataError(f"{data} was encoded with another vocabulary for feature {name!r} "
                            f"({theirs[name][:12]}) than {reference} ({digest[:12]}); its ids mean other "
                            f"values. Score the raw Parquet instead, or encode it with the same data")


# ---------------------------------------------------------------- readers' lock

def _open_dir(path: Path) -> int:
    return os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


@contextlib.contextmanager
def reading_dataset(path) -> Iterator[None]:
    """Hold a shared lock on the dataset directory while a job reads it.

    Waits only for an ingest's swap in progress; if the directory was swapped while waiting,
    locks the new one.
    """
    path = Path(path)
    while True:
        fd = _open_dir(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def no_readers(path) -> Iterator[None]:
    """Exclusive lock on the dataset directory, or a DataError if a running job reads it."""
    path = Path(path)
    if not path.is_dir():
        yield
        return
    fd = _open_dir(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise DataError(f"{path} is being read by a running job (a training or evaluation); refusing to "
                            f"replace it under that job. Write the new dataset to another directory, or wait "
                            f"for the job to finish") from None
        yield
    finally:
        os.close(fd)


def check_no_readers(path) -> None:
    """Fail fast, before any work, when a dataset at `path` is in use."""
    with no_readers(path):
        pass
