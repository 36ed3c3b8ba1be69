"""Single-process batch reader over an encoded dataset: row groups → shuffled → Batch.

Memory stays bounded: only a buffer of a few row groups is decoded at a time. The row order
of an epoch is a pure function of (seed, epoch, shard), so `start_row` can resume exactly.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import torch

from embtables.errors import ConfigError
from embtables.pipelines.data.parquet_io import open_parquet, read_row_group
from embtables.pipelines.data.encode import load_stats
from embtables.rows import Batch, dense_features, sparse_ids, to_kjt

BUFFER_ROW_GROUPS = 4  # rows are shuffled within this many row groups


@dataclass(frozen=True)
class _Unit:
    """Rows [start, stop) of one row group; `file_row` is where the row group starts in its file."""

    path: Path
    row_group: int
    file_row: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


class _Rows:
    """A block of decoded rows: label, dense, the single-hot ids of every feature as one
    [rows, n_single] block (a batch gathers it in one indexing op, not one per feature), and
    per multi-hot feature (lengths, flat values, offsets).

    `slots[k]` says where key k lives: ("single", column of the block) or ("multi", index).
    """

    def __init__(self, label, dense, single, multi_lengths, multi_values, slots):
        self.label, self.dense, self.single, self.slots = label, dense, single, slots
        self.multi_lengths, self.multi_values = multi_lengths, multi_values
        self.multi_offsets = [_offsets(lengths) for lengths in multi_lengths]

    def __len__(self) -> int:
        return len(self.label)

    def _new(self, label, dense, single, multi_lengths, multi_values) -> "_Rows":
        return _Rows(label, dense, single, multi_lengths, multi_values, self.slots)

    def take(self, idx: np.ndarray) -> "_Rows":
        values = []
        for lengths, offs, vals in zip(self.multi_lengths, self.multi_offsets, self.multi_values):
            new_len = lengths[idx]  # gather each row's run of values
            starts = np.repeat(offs[:-1][idx], new_len)
            within = np.arange(new_len.sum()) - np.repeat(_offsets(new_len)[:-1], new_len)
            values.append(vals[starts + within])
        return self._new(self.label[idx], self.dense[idx], self.single[idx],
                         [lengths[idx] for lengths in self.multi_lengths], values)

    def pick(self, order: np.ndarray | None, a: int, b: int) -> "_Rows":
        """Rows a..b of this block's epoch order: `order[a:b]` (shuffled), else rows a..b."""
        return self.slice(a, b) if order is None else self.take(order[a:b])

    def slice(self, a: int, b: int) -> "_Rows":
        return self._new(self.label[a:b], self.dense[a:b], self.single[a:b],
                         [lengths[a:b] for lengths in self.multi_lengths],
                         [v[o[a]:o[b]] for v, o in zip(self.multi_values, self.multi_offsets)])

    @staticmethod
    def concat(parts: list["_Rows"]) -> "_Rows":
        if len(parts) == 1:
            return parts[0]
        n = len(parts[0].multi_lengths)
        return parts[0]._new(np.concatenate([p.label for p in parts]), np.concatenate([p.dense for p in parts]),
                             np.concatenate([p.single for p in parts]),
                             [np.concatenate([p.multi_lengths[i] for p in parts]) for i in range(n)],
                             [np.concatenate([p.multi_values[i] for p in parts]) for i in range(n)])

    def to_batch(self, keys: list[str]) -> Batch:
        ones = np.ones(len(self), dtype=np.int32)
        sparse = to_kjt(keys, [self.single[:, i] if kind == "single" else self.multi_values[i]
                               for kind, i in self.slots],
                        [ones if kind == "single" else self.multi_lengths[i] for kind, i in self.slots])
        return Batch(label=torch.from_numpy(np.ascontiguousarray(self.label)),
                     dense=torch.from_numpy(np.ascontiguousarray(self.dense)), sparse=sparse, rows=len(self))


def _offsets(lengths: np.ndarray) -> np.ndarray:
    offs = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offs[1:])
    return offs


class _Reader:
    """Decodes units of one split, validating ids against each feature's table rows."""

    def __init__(self, dataset_dir: Path, stats: dict):
        self.dir, self.stats = dataset_dir, stats
        self.columns = [stats["label"]] + stats["dense"] + stats["sparse"]
        # One ParquetFile per decode thread: a ParquetFile's reader is not safe to share between
        # threads (two concurrent read_row_group calls on one handle were seen to hang).
        self._local = threading.local()

    def file(self, path: Path):
        """This thread's open ParquetFile of `path` (a dataset file: dataset dir / its relative name)."""
        files = self._local.__dict__.setdefault("files", {})
        if path not in files:
            files[path] = open_parquet(path, self.columns)
        return files[path]

    def units(self, files: list[str]) -> list[_Unit]:
        units = []
        for rel in files:
            meta = self.file(self.dir / rel).metadata
            row = 0
            for g in range(meta.num_row_groups):
                n = meta.row_group(g).num_rows
                units.append(_Unit(self.dir / rel, g, row, 0, n))
                row += n
        return units

    def read(self, unit: _Unit) -> _Rows:
        pf = self.file(unit.path)
        t = read_row_group(pf, unit.path, unit.row_group, self.columns).slice(unit.start, unit.rows)
        label = t.column(self.stats["label"]).to_numpy().astype(np.float32)
        row0 = unit.file_row + unit.start
        dense = dense_features(t, self.stats["dense"], str(unit.path), row0)
        single, multi_lengths, multi_values, slots = [], [], [], []
        for name in self.stats["sparse"]:
            ids, lens = sparse_ids(t.column(name), name, self.stats["features"][name]["rows"], str(unit.path), row0)
            if pa.types.is_list(t.schema.field(name).type):
                slots.append(("multi", len(multi_lengths)))
                multi_lengths.append(lens)
                multi_values.append(ids)
            else:
                slots.append(("single", len(single)))
                single.append(ids)
        block = np.stack(single, 1) if single else np.zeros((len(label), 0), dtype=np.int64)
        return _Rows(label, dense, block, multi_lengths, multi_values, slots)


def _shard(units: list[_Unit], rank: int, world: int) -> list[_Unit]:
    """Whole row groups round-robin; the last `len % world` are split by rows among all shards."""
    whole = len(units) // world * world
    mine = units[rank:whole:world]
    for u in units[whole:]:
        a = u.start + u.rows * rank // world
        b = u.start + u.rows * (rank + 1) // world
        if b > a:
            mine.append(_Unit(u.path, u.row_group, u.file_row, a, b))
    return mine


def iterate_batches(dataset_dir, split: str, batch_size: int, *, shuffle: bool, seed: int = 0,
                    epoch: int = 0, drop_last: bool = False, start_row: int = 0,
                    shard: tuple[int, int] = (0, 1), workers: int = 1) -> Iterator[Batch]:
    """Batches of one split; with `shuffle`, the order depends only on (seed, epoch, shard).

    `start_row` skips that many rows of this shard's epoch order (resume). Shards are disjoint
    and together cover every row exactly once. The last partial batch is yielded unless
    `drop_last`. `workers` > 1 decodes a buffer's row groups on that many threads (Parquet
    decoding releases the GIL); the batches are the same for any `workers`.
    """
    rank, world = shard
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"shard must be (rank, world) with 0 <= rank < world, got {shard}")
    if batch_size < 1 or start_row < 0:
        raise ConfigError(f"batch_size must be >= 1 and start_row >= 0, got {batch_size}, {start_row}")
    dataset_dir = Path(dataset_dir)
    stats = load_stats(dataset_dir)
    if split not in stats["splits"]:
        raise ConfigError(f"{dataset_dir}: no split {split!r}; available: {', '.join(stats['splits'])}")
    reader = _Reader(dataset_dir, stats)
    units = reader.units(stats["splits"][split]["files"])
    if shuffle:
        # Same permutation on every rank (no rank in the seed), so the shards stay disjoint.
        order = np.random.default_rng([seed, epoch]).permutation(len(units))
        units = [units[i] for i in order]
    units = _shard(units, rank, world)
    keys = stats["sparse"]
    pool = ThreadPoolExecutor(workers, thread_name_prefix="embtables-decode") if workers > 1 else None
    try:
        pending: _Rows | None = None  # fewer than batch_size rows carried into the next buffer
        skip = start_row
        for b in range(0, len(units), BUFFER_ROW_GROUPS):
            group = units[b:b + BUFFER_ROW_GROUPS]
            n = sum(u.rows for u in group)
            if skip >= n:  # resume: whole buffers before start_row are never read
                skip -= n
                continue
            rows = _Rows.concat(list(pool.map(reader.read, group) if pool else map(reader.read, group)))
            # This buffer's epoch order is a permutation (shuffle) or the file order; each batch
            # gathers only its own rows, so the first batch leaves without a copy of the buffer.
            order = np.random.default_rng([seed, epoch, rank, b]).permutation(n) if shuffle else None
            a, skip = skip, 0
            if pending is not None:
                need = batch_size - len(pending)
                pending = _Rows.concat([pending, rows.pick(order, a, min(a + need, n))])
                a = min(a + need, n)
                if len(pending) < batch_size:
                    continue
                yield pending.to_batch(keys)
                pending = None
            while a + batch_size <= n:
                yield rows.pick(order, a, a + batch_size).to_batch(keys)
                a += batch_size
            pending = rows.pick(order, a, n) if a < n else None
        if pending is not None and not drop_last:
            yield pending.to_batch(keys)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
