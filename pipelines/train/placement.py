"""A batch onto the model's device, once per step (after any batch filter).

The sparse KJT is put in the collection's input order on the host (plain torch, offsets and
per-key lengths filled in), so the device never runs fbgemm's permute/cumsum ops, which the CPU
build of fbgemm_gpu lacks on CUDA, and the collection's split needs no device→host sync. On CUDA
the tensors are pinned (on the prefetch thread when there is one) and copied non-blocking.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from embtables.jagged import order_keys


def host_ready(batch, keys: list[str], pin: bool):
    """The batch with its KJT in `keys` order (a no-op when it already is), pinned if `pin`."""
    sparse = batch.sparse
    if sparse.keys() != keys or sparse.offsets_or_none() is None:
        sparse = order_keys(sparse, keys)
    batch = replace(batch, sparse=sparse)
    if pin:
        batch = replace(batch, label=_pinned(batch.label), dense=_pinned(batch.dense),
                        sparse=batch.sparse if _kjt_pinned(batch.sparse) else batch.sparse.pin_memory())
    return batch


def to_device(batch, keys: list[str], device: torch.device):
    """The batch on `device` (label, dense, KJT); CPU batches only get their keys ordered."""
    cuda = device.type == "cuda"
    batch = host_ready(batch, keys, pin=cuda)
    if device.type == "cpu":
        return batch
    return replace(batch, label=batch.label.to(device, non_blocking=cuda),
                   dense=batch.dense.to(device, non_blocking=cuda),
                   sparse=batch.sparse.to(device, non_blocking=cuda))


def _pinned(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_pinned() else t.pin_memory()


def _kjt_pinned(kjt) -> bool:
    return kjt.values().is_pinned() and kjt.lengths().is_pinned()
