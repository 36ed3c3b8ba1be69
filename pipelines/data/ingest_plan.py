"""How the ingest passes spread out: row-group pieces, mapped in stream order over threads or Ray.

Both passes of `encode.prepare_parquet` work piece by piece (one Parquet row group each), so
any number of workers can share them. Results come back in input order with a bounded number
of pieces in flight, so memory stays bounded, the encoded files are written in stream order
(byte for byte what one worker writes), and the first bad row reported is the first in the
stream. On one machine threads suffice: a piece's work is Arrow and pandas kernels that release
the GIL. With a Ray address every piece is a Ray task (the input files must be readable at the
same paths on every node); the writes stay on the driver.
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import pyarrow.parquet as pq


@dataclass(frozen=True)
class Piece:
    path: Path
    row_group: int
    file_row: int    # index of its first row in its file (errors name file rows)
    stream_row: int  # index of its first row over all files of the pass (the split hashes it)
    rows: int


def plan_pieces(files: list[Path], opened: Callable[[Path], pq.ParquetFile]) -> list[Piece]:
    """Every non-empty row group of `files`, in stream order; `opened` opens and checks a file."""
    pieces, stream_row = [], 0
    for path in files:
        meta = opened(path).metadata
        file_row = 0
        for i in range(meta.num_row_groups):
            n = meta.row_group(i).num_rows
            if n:
                pieces.append(Piece(path, i, file_row, stream_row, n))
            file_row += n
            stream_row += n
    return pieces


def default_workers() -> int:
    """Every core this process may run on. On 2 cores (RESULTS.md, Ingest) 2 threads halve the
    driver's share of the work (4.1 vs 8.8 CPU seconds on the 4M-row input) for the same total:
    each piece's reading, checks, counting and lookups run in Arrow, numpy and pandas kernels
    that release the GIL (it is held for ~2 of ~10 CPU seconds)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class Runner:
    """Maps `fn(context, item)` over items in order: inline, on threads, or as Ray tasks."""

    def __init__(self, workers: int | None = None, address: str | None = None):
        self.address = address
        self.workers = max(1, workers or default_workers())
        self._ray_started = False
        if address is not None:
            import ray

            if not ray.is_initialized():
                ray.init(address=address, log_to_driver=False, include_dashboard=False)
                self._ray_started = True
            if workers is None:
                self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))

    def close(self) -> None:
        if self._ray_started:
            import ray

            ray.shutdown()
            self._ray_started = False

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def map(self, fn: Callable, context, items: Iterable) -> Iterator:
        """fn(context, item) for each item, yielded in order; at most `workers` in flight (memory: one piece each)."""
        if self.address is not None:
            yield from self._ray_map(fn, context, items)
        elif self.workers == 1:
            for item in items:
                yield fn(context, item)
        else:
            pool = ThreadPoolExecutor(self.workers, thread_name_prefix="ingest")
            try:
                yield from _windowed((lambda item: pool.submit(fn, context, item)), items,
                                     lambda f: f.result(), self.workers)
            finally:
                pool.shutdown(wait=True, cancel_futures=True)

    def _ray_map(self, fn: Callable, context, items: Iterable) -> Iterator:
        import ray

        task = ray.remote(fn)
        ref = ray.put(context)  # shipped once, not once per task
        yield from _windowed(lambda item: task.remote(ref, item), items, ray.get, self.workers,
                             cancel=ray.cancel)


def _windowed(submit: Callable, items: Iterable, wait: Callable, window: int,
              cancel: Callable | None = None) -> Iterator:
    """Submit items ahead up to `window`, yield each result in item order.

    On an error (or when the consumer stops early) the work still ahead is cancelled.
    """
    it = iter(items)
    ahead: deque = deque()
    try:
        for item in it:
            ahead.append(submit(item))
            if len(ahead) >= window:
                break
        while ahead:
            result = wait(ahead.popleft())
            for item in it:
                ahead.append(submit(item))
                break
            yield result
    finally:
        if cancel is not None:
            for job in ahead:
                cancel(job)
