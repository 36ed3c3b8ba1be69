"""Prefetch batches on a background thread so reading and decoding overlap the train step.

Parquet decoding and numpy work release the GIL, so the next batches are prepared while the
current step computes (training also orders and pins them there: pipelines/train/placement.py).
Errors in the producer are re-raised in the consumer; leaving the loop early stops the thread.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
_DONE = object()


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
