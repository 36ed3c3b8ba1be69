"""Ray Data → training batches: read_parquet, one streaming split per worker, KJT batches.

Exactly-once rows. A streaming split hands blocks to whichever worker asks first, so which
rows a worker sees is not reproducible; positions are therefore kept as *sets of rows*:
every row carries Ray Data's `row_hash` (a deterministic hash of its file path and position in
the file), each worker records the hashes of the rows it trained on this epoch, and after a
resume every worker drops rows whose hash is in the union of those records. Cost: 8 bytes per
row trained so far in the current epoch, per checkpoint. The split is not `equal` (that drops
rows to even the workers out); workers that run dry train on empty padding steps instead.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embtables.rows import Batch, dense_features, sparse_ids, to_kjt

HASH = "row_hash"


def dataset(dataset_dir: Path, stats: dict, split: str, block_rows: int, shuffle_seed: int | None = None):
    """The split as a Ray Dataset with a `row_hash` column (files shuffled when a seed is given),
    cut into blocks of at most `block_rows` rows so the streaming split can balance the workers
    (a whole Parquet file is otherwise one block, all of it for one worker)."""
    import ray.data
    from ray.data.datasource import FileShuffleConfig

    files = [str((Path(dataset_dir) / rel).resolve()) for rel in stats["splits"][split]["files"]]
    columns = [stats["label"]] + stats["dense"] + stats["sparse"]
    shuffle = FileShuffleConfig(seed=shuffle_seed) if shuffle_seed is not None else None
    ds = ray.data.read_parquet(files, columns=columns, include_row_hash=True, shuffle=shuffle)
    return ds.repartition(target_num_rows_per_block=block_rows)  # streaming: no full shuffle


def all_rows_data_config(datasets_to_split="all"):
    """Ray Train's DataConfig, but with `equal=False` streaming splits (no row is dropped)."""
    from ray.train import DataConfig

    class AllRowsDataConfig(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            out = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                for i, it in enumerate(ds.streaming_split(world_size, equal=False)):
                    out[i][name] = it
            return out

    return AllRowsDataConfig(datasets_to_split)


def to_batch(table: pa.Table, stats: dict, split: str) -> Batch:
    """A pyarrow batch of encoded rows → Batch (dense transformed, ids checked), with its row hashes."""
    where = f"{split} split"
    label = table.column(stats["label"]).to_numpy().astype(np.float32)
    ids = [sparse_ids(table.column(n), n, stats["features"][n]["rows"], where) for n in stats["sparse"]]
    return Batch(label=torch.from_numpy(np.ascontiguousarray(label)),
                 dense=torch.from_numpy(dense_features(table, stats["dense"], where)),
                 sparse=to_kjt(stats["sparse"], [v for v, _ in ids], [n for _, n in ids]),
                 rows=table.num_rows, hashes=table.column(HASH).to_numpy().astype(np.uint64, copy=False))


def shard_batches(shard, stats: dict, split: str, batch_size: int, *, skip: np.ndarray | None = None,
                  shuffle_buffer: int = 0, seed: int | None = None, prefetch: int = 2) -> Iterator[Batch]:
    """One pass over this worker's streaming split: full batches of `batch_size` rows, the
    last one partial; rows whose hash is in the sorted array `skip` are left out (resume)."""
    pending: list[pa.Table] = []
    n_pending = 0
    for table in shard.iter_batches(batch_size=batch_size, batch_format="pyarrow", prefetch_batches=prefetch,
                                    local_shuffle_buffer_size=shuffle_buffer or None, local_shuffle_seed=seed):
        if skip is not None and skip.size:
            hashes = table.column(HASH).to_numpy().astype(np.uint64, copy=False)
            table = table.filter(pa.array(~sorted_contains(skip, hashes)))
        if table.num_rows == 0:
            continue
        pending.append(table)
        n_pending += table.num_rows
        while n_pending >= batch_size:
            merged = pa.concat_tables(pending) if len(pending) > 1 else pending[0]
            yield to_batch(merged.slice(0, batch_size), stats, split)
            rest = merged.slice(batch_size)
            pending, n_pending = ([rest] if rest.num_rows else []), rest.num_rows
    if n_pending:
        yield to_batch(pa.concat_tables(pending), stats, split)


def sorted_contains(sorted_values: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Boolean mask: which entries of `x` occur in the sorted array `sorted_values`."""
    pos = np.searchsorted(sorted_values, x)
    pos[pos == sorted_values.size] = 0
    return sorted_values[pos] == x


def padding_batch(stats: dict) -> Batch:
    """One row of id 0 everywhere, to be weighted 0: keeps a worker in step when it has run dry."""
    keys = list(stats["sparse"])
    kjt = KeyedJaggedTensor(keys=keys, values=torch.zeros(len(keys), dtype=torch.int64),
                            lengths=torch.ones(len(keys), dtype=torch.int32))
    return Batch(label=torch.zeros(1), dense=torch.zeros(1, len(stats["dense"])), sparse=kjt, rows=0,
                       hashes=np.zeros(0, np.uint64))
