"""KeyedJaggedTensor steps in plain torch, so they run on any device without fbgemm's ops.

TorchRec computes a KJT's offsets (`asynchronous_complete_cumsum`) and its key permutation
(`permute_2D_sparse_data`) with fbgemm ops; the CPU build of fbgemm_gpu has no CUDA kernels
for them, so on a GPU with that build they fail. Here the offsets are a cumsum of the lengths
and a permutation is a gather built from the per-key lengths. `order_keys` runs on the host
before a batch moves to the device: the result carries its offsets and per-key lengths, so
`.to(device)` keeps them and the later `split` needs no device→host sync.
"""
from __future__ import annotations

from itertools import accumulate

import torch
from torchrec import KeyedJaggedTensor


def kjt_offsets(kjt: KeyedJaggedTensor) -> torch.Tensor:
    """The KJT's offsets (length keys·B + 1): stored ones, else a cumsum of its lengths."""
    offsets = kjt.offsets_or_none()
    if offsets is not None:
        return offsets
    return _complete_cumsum(kjt.lengths())


def _complete_cumsum(lengths: torch.Tensor) -> torch.Tensor:
    """[0, l0, l0+l1, ...]: offsets from lengths."""
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.long, device=lengths.device)
    torch.cumsum(lengths, 0, out=offsets[1:])
    return offsets


def order_keys(kjt: KeyedJaggedTensor, keys: list[str]) -> KeyedJaggedTensor:
    """`kjt` restricted to `keys`, in that order, with offsets and per-key lengths filled in.

    Raises KeyError naming a key the KJT lacks. Keys already in order: no copy of the values.
    """
    have = kjt.keys()
    index = {k: i for i, k in enumerate(have)}
    missing = [k for k in keys if k not in index]
    if missing:
        raise KeyError(f"the input lacks sparse features {missing} (it has {have})")
    order = [index[k] for k in keys]
    stride = kjt.stride()
    lengths = kjt.lengths()
    per_key = kjt.length_per_key()  # host ints (a sync on a device tensor: call this on the host)
    starts = list(accumulate(per_key, initial=0))
    weights = kjt.weights_or_none()
    values = kjt.values()
    if order != list(range(len(have))):
        lengths = lengths.view(len(have), stride)[order].reshape(-1)
        gather = torch.cat([torch.arange(starts[k], starts[k + 1], device=values.device) for k in order]
                           or [torch.zeros(0, dtype=torch.long, device=values.device)])
        values = values[gather]
        weights = None if weights is None else weights[gather]
    new_per_key = [per_key[k] for k in order]
    return KeyedJaggedTensor(keys=list(keys), values=values, weights=weights, lengths=lengths,
                             offsets=_complete_cumsum(lengths), stride=stride, length_per_key=new_per_key,
                             offset_per_key=list(accumulate(new_per_key, initial=0)))
