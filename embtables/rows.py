"""Rows → model inputs, written once for training (single process and Ray Data) and serving:
the batch type, the dense transform and the checked decoding of sparse id columns."""
from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torchrec import KeyedJaggedTensor

from embtables.arrow_sparse import flatten
from embtables.errors import DataError

# Dense features are heavy-tailed counts; the export manifest records this string.
DENSE_TRANSFORM = "log1p(max(x, 0)); missing/NaN → 0"


@dataclass
class Batch:
    label: torch.Tensor | None          # [B] float32 (None: a table scored without labels)
    dense: torch.Tensor                 # [B, n_dense] float32, DENSE_TRANSFORM applied
    sparse: KeyedJaggedTensor           # ids per feature, keys in the model's (or stats') order
    rows: int
    hashes: np.ndarray | None = None    # Ray Data's uint64 row_hash per row (exactly-once bookkeeping)


def dense_features(table, names: list[str], where: str, row0: int = 0, out: np.ndarray | None = None) -> np.ndarray:
    """[rows, len(names)] float32 through DENSE_TRANSFORM (into `out` if given); inf (or beyond
    float32) is a DataError."""
    if not names:
        return np.zeros((table.num_rows, 0), dtype=np.float32) if out is None else out
    with np.errstate(over="ignore"):  # beyond float32 becomes inf, reported below
        x = np.stack([table.column(n).to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
                      for n in names], 1, out=out)
    bad = np.isinf(x)
    if bad.any():
        i, j = map(int, np.argwhere(bad)[0])
        raise DataError(f"{where}: row {row0 + i}: dense column {names[j]!r} is {table.column(names[j])[i].as_py()}, "
                        f"inf or beyond float32")
    x[np.isnan(x)] = 0.0  # missing values arrive as NaN
    return np.log1p(np.maximum(x, 0.0, out=x), out=x)


def checked_ids(flat: pa.Array, lengths: np.ndarray, name: str, rows: int, where: str,
                row0: int = 0) -> np.ndarray:
    """Flat int ids as int64, each in [0, rows); else a DataError naming the row."""
    if not pa.types.is_integer(flat.type):
        raise DataError(f"{where}: column {name!r} holds {flat.type} values, not encoded int ids")
    if flat.null_count:
        bad = flat.is_null().to_numpy(zero_copy_only=False)
    else:
        ids = flat.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        if not len(ids) or ids.view(np.uint64).max() < rows:  # one pass: a negative id reads as huge
            return ids
        bad = (ids < 0) | (ids >= rows)
    j = int(np.flatnonzero(bad)[0])  # a null, or an id outside [0, rows): there is one
    i = int(np.searchsorted(np.cumsum(lengths), j, side="right"))  # value index → row
    raise DataError(f"{where}: row {row0 + i}: column {name!r} has id {flat[j].as_py()}, outside [0, {rows})")


def sparse_ids(col, name: str, rows: int, where: str, row0: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An encoded sparse column (int ids, or lists of them) → (int64 ids, int32 lengths), checked."""
    flat, lengths = flatten(col)
    lengths = np.ones(len(col), dtype=np.int32) if lengths is None else lengths
    return checked_ids(flat, lengths, name, rows, where, row0), lengths


def to_kjt(keys: list[str], values: list[np.ndarray], lengths: list[np.ndarray]) -> KeyedJaggedTensor:
    """Per-key ids and per-row lengths → a KJT (see flat_kjt)."""
    if not keys:
        return KeyedJaggedTensor(keys=[], values=torch.zeros(0, dtype=torch.long),
                                 lengths=torch.zeros(0, dtype=torch.int32))
    return flat_kjt(keys, np.concatenate(values), np.concatenate(lengths), [len(v) for v in values])


def flat_kjt(keys: list[str], values: np.ndarray, lengths: np.ndarray, per_key: list[int],
             offsets: np.ndarray | None = None) -> KeyedJaggedTensor:
    """Key-major ids, per-row lengths (and their offsets, if known) and ids per key → a KJT
    that carries its offsets and per-key lengths, so neither ordering it (jagged.order_keys) nor
    splitting it by key computes them again."""
    if offsets is None:
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
    return KeyedJaggedTensor(keys=list(keys), values=torch.from_numpy(values), lengths=torch.from_numpy(lengths),
                             offsets=torch.from_numpy(offsets), stride=len(lengths) // len(keys),
                             length_per_key=per_key, offset_per_key=list(accumulate(per_key, initial=0)))
