"""A held-out slice of the training split, chosen by a seeded hash of each row's content.

A row is held out when hash(seed, its sparse ids, its dense values) falls below `fraction`. The
choice does not depend on batch size, shuffling, file layout or the label, so the rows a search
scores are exactly the rows its supernet never trained on, however each stage reads the data.
"""
from __future__ import annotations

import numpy as np
import torch
from torchrec import KeyedJaggedTensor

from embtables.hashing import GOLDEN, mix64_array as _mix, uniform_of
from embtables.rows import Batch

_GOLDEN = np.uint64(GOLDEN)


def row_hashes(batch: Batch, seed: int) -> np.ndarray:
    """One uint64 per row from its sparse ids (bags summed: order-free) and dense values."""
    kjt = batch.sparse
    n_keys, rows = len(kjt.keys()), batch.rows
    values = kjt.values().numpy().astype(np.int64).view(np.uint64)
    lengths = kjt.lengths().numpy().astype(np.int64)
    h = np.full(rows, np.uint64(seed & 0xFFFFFFFFFFFFFFFF), dtype=np.uint64)
    with np.errstate(over="ignore"):
        salted = _mix(values + np.repeat(np.arange(n_keys, dtype=np.uint64) * _GOLDEN + _GOLDEN,
                                         lengths.reshape(n_keys, rows).sum(1)))
        cum = np.concatenate([np.zeros(1, np.uint64), np.cumsum(salted, dtype=np.uint64)])
        ends = np.cumsum(lengths)
        bag_sums = (cum[ends] - cum[ends - lengths]).reshape(n_keys, rows)
        for column in bag_sums:
            h = _mix(h * _GOLDEN + column)
        dense = np.ascontiguousarray(batch.dense.numpy(), dtype=np.float32).view(np.uint32).astype(np.uint64)
        for column in dense.T:
            h = _mix(h * _GOLDEN + column)
    return _mix(h)


def held_out(batch: Batch, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the batch's rows that belong to the held-out slice."""
    return uniform_of(row_hashes(batch, seed)) < fraction


def subset_batch(batch: Batch, keep: np.ndarray) -> Batch:
    """The rows of `batch` where `keep` is True, sparse bags included."""
    keep_t = torch.from_numpy(np.asarray(keep, dtype=bool))
    kjt = batch.sparse
    n_keys = len(kjt.keys())
    lengths = kjt.lengths().view(n_keys, batch.rows)
    value_keep = torch.repeat_interleave(keep_t.repeat(n_keys), lengths.reshape(-1).long())
    weights = kjt.weights_or_none()
    sparse = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values()[value_keep],
                               lengths=lengths[:, keep_t].reshape(-1),
                               weights=None if weights is None else weights[value_keep])
    return Batch(label=batch.label[keep_t], dense=batch.dense[keep_t], sparse=sparse, rows=int(keep_t.sum()))


def excluding_held_out(fraction: float, seed: int):
    """A batch filter for training that drops the held-out rows."""
    return lambda batch: subset_batch(batch, ~held_out(batch, fraction, seed))
