"""Host memory for the CPU kernels: tables on 2 MB pages, and pooled outputs that reuse pages.

A fresh tensor of tens of MB is a fresh mapping: the kernel zeroes every page on its first write
(a tenth of a fused train step at dim 64). `ReusedOutputs` hands out [rows, dim] tensors whose
memory returns to it, not to the OS, once torch frees the last view of them: the storage wraps a
numpy array over a ctypes block, and that block's finalizer is the "freed" signal.
"""
from __future__ import annotations

import ctypes
import functools
import sys
import weakref

import numpy as np
import torch

_HUGE = 2 << 20  # 2 MB: an x86-64 transparent huge page
_MADV_HUGEPAGE = 14


@functools.cache
def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
    except OSError:
        return None


def hugepage_empty(rows: int, dim: int) -> torch.Tensor:
    """An uninitialised [rows, dim] float tensor the kernel may back with 2 MB pages (Linux THP
    in madvise mode). Random row reads over a large table otherwise miss the TLB on nearly
    every access; asked for before the first touch, so the pages are huge from the start."""
    numel = rows * dim
    if numel * 4 < 2 * _HUGE or _libc() is None:
        return torch.empty(rows, dim)
    raw = torch.empty(numel + _HUGE // 4)
    start = (raw.data_ptr() + _HUGE - 1) & ~(_HUGE - 1)
    _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(numel * 4 // _HUGE * _HUGE), _MADV_HUGEPAGE)
    offset = (start - raw.data_ptr()) // 4
    return raw[offset:offset + numel].view(rows, dim)  # failure to madvise only costs speed


class ReusedOutputs:
    """Uninitialised [rows, dim] float tensors; a freed one's memory serves the next request of
    its shape. At most `keep` idle blocks per shape are held (train and eval batches differ)."""

    def __init__(self, keep: int = 2, min_bytes: int = 2 * _HUGE):
        self.keep, self.min_bytes = keep, min_bytes
        self._idle: dict[tuple[int, int], list[torch.Tensor]] = {}  # list pop/append: atomic

    def empty(self, rows: int, dim: int) -> torch.Tensor:
        if rows * dim * 4 < self.min_bytes:
            return torch.empty(rows, dim)  # small: the allocator's own reuse is enough
        try:
            block = self._idle[(rows, dim)].pop()
        except (KeyError, IndexError):
            block = hugepage_empty(rows, dim)
        view = (ctypes.c_float * block.numel()).from_address(block.data_ptr())
        weakref.finalize(view, self._release, (rows, dim), block)
        return torch.from_numpy(np.ctypeslib.as_array(view)).view(rows, dim)

    def _release(self, shape: tuple[int, int], block: torch.Tensor) -> None:
        idle = self._idle.setdefault(shape, [])
        if len(idle) < self.keep:
            idle.append(block)
