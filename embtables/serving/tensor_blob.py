"""A stored table's parts (codes, scale, bias, …) as ONE uint8 tensor of an export.

safetensors writes a ~65-byte JSON header entry per tensor; at three parts a table that
header was up to 8% of the smallest quantized artifacts. One tensor per table, with the
parts' dtypes and shapes in the manifest, keeps the header a small share of the file.
A single-part item (an fp32 table) is stored as is, so fp32 exports stay plain tensors.
"""
from __future__ import annotations

import torch

from embtables.errors import ExportError


def torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ExportError(f"unknown dtype {name!r} in the manifest")
    return dtype


def pack_parts(parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[dict]]:
    """(the tensor to store, its layout: [{role, dtype, shape}] in byte order)."""
    layout = [{"role": role, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
              for role, t in parts.items()]
    if len(parts) == 1:
        return next(iter(parts.values())).detach().cpu().contiguous(), layout
    raw = [t.detach().cpu().contiguous().reshape(-1).view(torch.uint8) for t in parts.values()]
    return torch.cat(raw), layout


def unpack_parts(stored: torch.Tensor, layout: list[dict]) -> dict[str, torch.Tensor]:
    """The inverse of pack_parts; raises ExportError when the sizes do not add up."""
    if len(layout) == 1:
        return {layout[0]["role"]: stored}
    if stored.dtype != torch.uint8 or stored.dim() != 1:
        raise ExportError(f"a packed tensor must be 1-D uint8, got {stored.dtype} {list(stored.shape)}")
    out, at = {}, 0
    for part in layout:
        dtype = torch_dtype(part["dtype"])
        n = torch.Size(part["shape"]).numel() * torch.empty(0, dtype=dtype).element_size()
        if at + n > stored.numel():
            break
        # clone: a fresh, aligned buffer to view as the part's dtype (the slice may be unaligned).
        out[part["role"]] = stored[at:at + n].clone().view(dtype).reshape(part["shape"])
        at += n
    if at != stored.numel() or len(out) != len(layout):
        raise ExportError(f"a packed tensor of {stored.numel()} bytes does not hold the parts {layout}")
    return out
