"""Quantized embedding tables: int8 / int4 (scale [+ bias]) and binary (sign bits + scale).

- int4 (asymmetric): per row, bias = min and scale = (max − min) / 15, both stored fp16 (fp32
  when values overflow fp16); code q = round((x − bias) / scale), x̂ = q·scale + bias.
- int8 (symmetric): only scale = max|x| / 127 is stored; the bias is implied, −128·scale
  (exact in fp16), so x̂ = q·scale + bias as for int4. An explicit fp16 bias would cost 2
  more bytes a row: at dim 16, 20 bytes instead of 18 (31% of fp32 instead of 28%), for no
  measurable accuracy at 8 bits.
- Narrow tables (dim < 16: mixed_dim blocks, low-rank factors) share one scale (and bias;
  for binary, one α per level) among ⌈16/dim⌉ consecutive rows, so a scale always covers
  ≥ 16 values and its cost stays ≤ 2 bytes per 16 codes whatever the dim; ids are in
  frequency order, so neighbouring rows have similar ranges. Tables of dim ≥ 16 are purely
  row-wise, FBGEMM's own format.
  Codes pack little-end first (element 2j in the low nibble of byte j), FBGEMM's layout; for
  FBGEMM the implied bias and shared scales are materialised per row at load time, so one
  set of bytes serves FBGEMM's IntNBit TBE and the torch path, with identical results.
- binary: residual ("recurrent") binarization with u bits per dim, as in the binary-embedding
  literature: r₀ = x; for level i, bᵢ = sign(rᵢ₋₁) ∈ {±1}^d and αᵢ = mean|rᵢ₋₁| (the scale
  that minimises ‖rᵢ₋₁ − αᵢbᵢ‖²); rᵢ = rᵢ₋₁ − αᵢbᵢ; x̂ = Σᵢ αᵢbᵢ. u = 1 is sign + scale.

A quantized table is a dict of plain tensors (role → tensor), so it saves as safetensors as is.
"""
from __future__ import annotations

import functools

import torch

PRECISIONS = ("none", "int8", "int4", "binary")
FP16_MAX = 65504.0
VALUES_PER_SCALE = 16  # the fewest values one scale (and bias) covers


def rows_per_scale(dim: int) -> int:
    """Rows that share one scale: 1 from dim 16 up, ⌈16/dim⌉ below."""
    return -(-VALUES_PER_SCALE // dim)


def check_precision(precision: str, binary_bits: int = 1) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "binary" and not 1 <= binary_bits <= 8:
        raise ValueError(f"binary bits per dim must be in [1, 8], got {binary_bits}")


# ---------------------------------------------------------------- bit packing

def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, dim] integer codes < 2^bits → [rows, ⌈dim·bits/8⌉] uint8, element j at bit (j·bits) mod 8."""
    per_byte = 8 // bits
    rows, dim = codes.shape
    padded = torch.zeros(rows, -(-dim // per_byte) * per_byte, dtype=torch.uint8, device=codes.device)
    padded[:, :dim] = codes.to(torch.uint8)
    parts = padded.view(rows, -1, per_byte)
    out = torch.zeros(rows, parts.shape[1], dtype=torch.uint8, device=codes.device)
    for k in range(per_byte):
        out |= parts[:, :, k] << (k * bits)
    return out


@functools.lru_cache(maxsize=16)
def byte_table(bits: int, device=None) -> torch.Tensor:
    """[256, 8 / bits] uint8: the codes packed in each possible byte (one gather unpacks a row)."""
    shifts = torch.arange(0, 8, bits, dtype=torch.int64)
    return ((torch.arange(256).unsqueeze(1) >> shifts) & ((1 << bits) - 1)).to(torch.uint8).to(device)


def unpack_codes(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The inverse of pack_codes: [rows, bytes] uint8 → [rows, dim] uint8 codes."""
    if bits == 8:
        return packed[:, :dim]
    codes = byte_table(bits, packed.device)[packed.long()]  # [rows, bytes, 8 / bits]
    return codes.reshape(packed.shape[0], -1)[:, :dim]


# ---------------------------------------------------------------- int8 / int4

def _scale_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp16 unless some value would overflow it (then fp32, and the table stays on the torch path)."""
    big = max((t.abs().max().item() for t in tensors if t.numel()), default=0.0)
    return torch.float16 if big < FP16_MAX / 2 else torch.float32


def quantize_rowwise(weight: torch.Tensor, bits: int, symmetric: bool = False,
                     group: int = 1) -> dict[str, torch.Tensor]:
    """fp32 [rows, dim] → {"codes": packed uint8 [rows, ·], "scale": [⌈rows/group⌉], "bias" (asymmetric)}."""
    if bits not in (4, 8):
        raise ValueError(f"row-wise quantization takes 4 or 8 bits, got {bits}")
    w = weight.detach().float()
    rows, dim = w.shape
    levels = (1 << bits) - 1
    # Each group of `group` rows as one flat row of values (the last group padded by repeats).
    pad = -rows % group
    flat = torch.cat([w, w[-1:].expand(pad, dim)]) if pad else w
    flat = flat.reshape(-1, group * dim)
    if symmetric:
        top = flat.abs().max(dim=1).values
        dtype = _scale_dtype(top)
        scale = (top / (levels // 2)).to(dtype)
        bias = implied_bias(scale, bits)
    else:
        lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
        dtype = _scale_dtype(lo, hi)
        # Round bias and scale to their stored dtype first, so the codes fit the stored values.
        bias = lo.to(dtype)
        scale = ((hi - bias.float()) / levels).to(dtype)
    per_row = lambda t: t.float().repeat_interleave(group)[:rows, None]  # noqa: E731
    safe = torch.where(per_row(scale) > 0, per_row(scale), torch.ones(rows, 1))
    q = torch.round((w - per_row(bias)) / safe).clamp_(0, levels)
    out = {"codes": pack_codes(q, bits), "scale": scale}
    return out if symmetric else {**out, "bias": bias}


def implied_bias(scale: torch.Tensor, bits: int) -> torch.Tensor:
    """The bias of symmetric codes: −2^(bits−1)·scale, exact in the scale's dtype (a power of two)."""
    return scale * -(1 << (bits - 1))


def rowwise_bias(q: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    """The stored bias, or the implied one of symmetric codes."""
    return q["bias"] if "bias" in q else implied_bias(q["scale"], bits)


def dequantize_rowwise(q: dict[str, torch.Tensor], bits: int, dim: int, rows: torch.Tensor | None = None,
                       group: int = 1) -> torch.Tensor:
    """x̂ = code·scale + bias as fp32, for every row or only `rows` (gathered before unpacking)."""
    codes = q["codes"]
    if rows is None:
        rows = torch.arange(codes.shape[0], device=codes.device)
    else:
        codes = codes[rows]
    g = rows // group
    scale = q["scale"][g]
    bias = q["bias"][g] if "bias" in q else implied_bias(scale, bits)  # only the gathered rows' biases
    return unpack_codes(codes, bits, dim).float() * scale.float()[:, None] + bias.float()[:, None]


def per_row_scale_bias(q: dict[str, torch.Tensor], bits: int, rows: int, group: int):
    """(scale, bias) repeated for every row, in the stored dtype (FBGEMM wants one pair a row)."""
    return tuple(t.repeat_interleave(group)[:rows].contiguous() for t in (q["scale"], rowwise_bias(q, bits)))


# ---------------------------------------------------------------- binary

def binarize(weight: torch.Tensor, levels: int = 1, group: int = 1) -> dict[str, torch.Tensor]:
    """fp32 [rows, dim] → {"signs": [rows, levels, ⌈dim/8⌉] uint8 (1 = +1), "scale": [⌈rows/group⌉, levels]}."""
    residual = weight.detach().float().clone()
    rows, dim = residual.shape
    g = torch.arange(rows) // group
    count = torch.bincount(g).float() * dim
    signs, scales = [], []
    for _ in range(levels):
        b = residual >= 0
        # α = mean |r| over the values that share it: the L2-optimal scale of a sign vector.
        alpha = torch.zeros(len(count)).index_add_(0, g, residual.abs().sum(dim=1)) / count
        signs.append(pack_codes(b, 1))
        scales.append(alpha)
        residual -= alpha[g, None] * (b.float() * 2 - 1)
    scale = torch.stack(scales, 1)
    return {"signs": torch.stack(signs, 1), "scale": scale.to(_scale_dtype(scale))}


def debinarize(q: dict[str, torch.Tensor], dim: int, rows: torch.Tensor | None = None,
               group: int = 1) -> torch.Tensor:
    """x̂ = Σ_levels scale·(2·bit − 1) as fp32, for every row or only `rows`."""
    signs, scale = q["signs"], q["scale"]
    if rows is None:
        rows = torch.arange(signs.shape[0], device=signs.device)
    else:
        signs = signs[rows]
    scale = scale[rows // group]
    n, levels, nbytes = signs.shape
    plus_minus = byte_table(1, signs.device).float() * 2 - 1  # [256, 8]: ±1 for each bit of a byte
    pm = plus_minus[signs.long()].reshape(n, levels, nbytes * 8)[:, :, :dim]
    return torch.einsum("nld,nl->nd", pm, scale.float())


# ---------------------------------------------------------------- one entry point per table

def quantize_table(weight: torch.Tensor, precision: str, binary_bits: int = 1) -> dict[str, torch.Tensor]:
    """A table at `precision`: {"weight"} for none, else the quantizer's tensors."""
    check_precision(precision, binary_bits)
    if precision == "none":
        return {"weight": weight.detach().float().contiguous()}
    group = rows_per_scale(weight.shape[1])
    if precision == "binary":
        return binarize(weight, binary_bits, group)
    if precision == "int8":
        return quantize_rowwise(weight, 8, symmetric=True, group=group)
    return quantize_rowwise(weight, 4, group=group)


def dequantize_table(q: dict[str, torch.Tensor], precision: str, dim: int,
                     rows: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 rows of a table stored by quantize_table (all, or the given row ids)."""
    if precision == "none":
        return q["weight"] if rows is None else q["weight"][rows]
    if precision == "binary":
        return debinarize(q, dim, rows, rows_per_scale(dim))
    return dequantize_rowwise(q, 8 if precision == "int8" else 4, dim, rows, rows_per_scale(dim))


def stored_bytes(q: dict[str, torch.Tensor]) -> int:
    """Bytes of a stored table, scales and biases included."""
    return sum(t.numel() * t.element_size() for t in q.values())


def expected_bytes(rows: int, dim: int, precision: str, binary_bits: int = 1, scale_bytes: int = 2) -> int:
    """What quantize_table stores for a rows × dim table (fp16 scales unless told otherwise)."""
    if precision == "none":
        return rows * dim * 4
    scales = -(-rows // rows_per_scale(dim))
    if precision == "binary":
        return binary_bits * (rows * -(-dim // 8) + scales * scale_bytes)
    if precision == "int8":  # symmetric: the scale only
        return rows * dim + scales * scale_bytes
    return rows * -(-dim // 2) + scales * 2 * scale_bytes
