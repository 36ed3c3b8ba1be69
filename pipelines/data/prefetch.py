"""The prefetching batch pipeline: the next batches are read, decoded, batched and given their
host-side model input on a background thread while the current step computes, so the step
does not wait for data.

Parquet decoding and numpy/torch work release the GIL, so the producer overlaps the step
(training orders the KJT's keys and offsets and pins for CUDA there: pipelines/train/placement.py).
The pipeline yields exactly the items the source yields, in the same order (depth 0: the same
work, inline). Errors in the producer are re-raised in the consumer as the same exception;
leaving the loop early (`close`) stops the thread and closes the source on it.
"""
from __future__ import annotations

import os
import queue
import threading
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
_DONE = object()

# Batches queued ahead by `prefetch: auto`: enough to cover the decode of the reader's next
# buffer of row groups (a burst of a few hundred ms) at ~1 MB per batch of 2048 Criteo rows.
AUTO_DEPTH = 8


def prefetch_plan(setting: int | str, cores: int | None = None) -> tuple[int, int]:
    """`train.prefetch` (auto | batches ahead, 0 = inline) → (queue depth, row-group decode threads).

    Measured on 2 cores (benchmarks/RESULTS.md, "Whole epoch vs step only, session 5"): the
    step's matrix products keep both cores busy, so a producer thread slows the steps by about
    what it hides, while inline the epoch waits ~4% of its time for data. So below 4 cores
    `auto` runs the same pipeline inline; from 4 cores on, a thread AUTO_DEPTH batches ahead,
    and from 8 a buffer's row groups decode in parallel.
    """
    if setting != "auto":
        return int(setting), 1
    cores = cores or os.cpu_count() or 1
    if cores < 4:
        return 0, 1
    return AUTO_DEPTH, 1 if cores < 8 else min(4, cores // 4)


def prefetched(batches: Iterable, depth: int, transform: Callable | None = None):
    """`batches` through `transform`, `depth` batches ahead on a thread (0: inline, the same work)."""
    if depth == 0:
        return (transform(b) for b in batches) if transform is not None else iter(batches)
    return Prefetcher(batches, depth=depth, transform=transform)


class Prefetcher(Iterator[T]):
    """Iterate `source` `depth` items ahead on a daemon thread; `transform` runs on that thread."""

    def __init__(self, source: Iterable[T], depth: int = 2, transform: Callable[[T], T] | None = None):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(iter(source), transform),
                                        name="embtables-prefetch", daemon=True)
        self._finished = False
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, source, transform) -> None:
        try:
            for item in source:
                if transform is not None:
                    item = transform(item)
                if not self._put(item):
                    return
        except BaseException as e:  # handed to the consumer, raised there
            self._put(_Failure(e))
            return
        finally:  # on this thread: a generator source runs its cleanup (e.g. its decode threads)
            if hasattr(source, "close"):
                source.close()
        self._put(_DONE)

    def __next__(self) -> T:
        if self._finished:
            raise StopIteration
        item = self._queue.get()
        if item is _DONE:
            self._finished = True
            raise StopIteration
        if isinstance(item, _Failure):
            self._finished = True
            raise item.error
        return item

    def close(self) -> None:
        """Stop the producer (the consumer left early) and wait for it."""
        self._stop.set()
        self._finished = True
        self._thread.join(timeout=5)

    def __del__(self):
        self._stop.set()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error
