"""How an export stores a method's own tensors (tables are quantize.py's business).

An fp32 export keeps every method tensor as trained. A quantized export also shrinks the two
kinds that would otherwise keep it above the tables' share of the fp32 bytes:
- 2-D float tensors (mixed_dim projections, low-rank bases): row-wise int8, whatever the
  tables' precision: they multiply every looked-up vector, so their error reaches every id,
  and they are small next to the tables.
- maps of kept rows (OptEmbed's row_of: −1 for a pruned id, else the running count of kept
  ids): exactly one bit per id, the keep mask, where int32 takes 4 bytes an id.
Everything else (scalars such as a threshold) is stored as is. `decode` gives back a plain
tensor of the exported dtype and shape, so methods are still rebuilt by `from_export`.
"""
from __future__ import annotations

import torch

from embtables.errors import ExportError
from embtables.serving.quantize import dequantize_table, expected_bytes, pack_codes, quantize_table, unpack_codes
from embtables.serving.tensor_blob import torch_dtype

ENCODINGS = ("none", "int8", "keep_bits")


def is_kept_row_map(t: torch.Tensor) -> bool:
    """1-D integers: −1 (dropped) or 0, 1, 2, … in order over the kept positions."""
    if t.dim() != 1 or t.dtype in (torch.bool, torch.uint8) or t.is_floating_point() or t.is_complex():
        return False
    kept = t[t >= 0]
    return bool((t >= -1).all()) and torch.equal(kept, torch.arange(kept.numel(), dtype=t.dtype))


def encode(t: torch.Tensor, quantize: str) -> tuple[str, dict[str, torch.Tensor]]:
    """(encoding, its parts) of one method tensor in an export of table precision `quantize`."""
    t = t.detach().cpu().contiguous()
    if quantize != "none":
        if t.dim() == 2 and t.is_floating_point() and expected_bytes(*t.shape, "int8") < t.numel() * 4:
            return "int8", quantize_table(t.float(), "int8")
        if is_kept_row_map(t):
            return "keep_bits", {"bits": pack_codes((t >= 0).view(1, -1), 1).view(-1)}
    return "none", {"value": t}


def decode(entry: dict, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The method tensor of a manifest entry ({encoding, dtype, shape}) back from its parts:
    int8 ones dequantized, keep bits expanded to the row map."""
    encoding, dtype, shape = entry["encoding"], torch_dtype(entry["dtype"]), entry["shape"]
    if encoding == "none":
        return parts["value"]
    if encoding == "int8":
        return dequantize_table(parts, "int8", shape[1]).to(dtype)
    if encoding == "keep_bits":
        keep = unpack_codes(parts["bits"].view(1, -1), 1, shape[0])[0].bool()
        out = torch.full(shape, -1, dtype=dtype)
        out[keep] = torch.arange(int(keep.sum()), dtype=dtype)
        return out
    raise ExportError(f"unknown method tensor encoding {encoding!r}; this embtables reads {ENCODINGS}")
