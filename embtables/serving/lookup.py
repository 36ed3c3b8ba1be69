"""The pooled lookup of an export: fp32 or quantized tables, FBGEMM IntNBit or torch.

Inputs have the TBE layout of the training lookup (values, offsets over K keys × B bags,
key-major), but several keys may read one table (multiplexed methods). fp32, int8 and int4
tables go to one FBGEMM `IntNBitTableBatchedEmbeddingBagsCodegen` call where fbgemm_gpu
imports; every other table (binary, fp32-scaled or odd-dim int4, or no FBGEMM) to the torch
path, which gathers the looked-up rows, dequantizes only those, and sums each bag.

Out-of-range ids (a `full` method passes raw ids straight through) raise the IndexError of the
training lookups, checked once before either path; TBE's own check is off (it maps them to row 0).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from embtables.errors import ExportError
from embtables.kernels.fbgemm_lookup import check_bounds, fbgemm_cuda_available, fbgemm_module_loads
from embtables.serving.quantize import dequantize_table, per_row_scale_bias, rows_per_scale

SERVING_BACKENDS = ("auto", "fbgemm", "torch")  # of ServingLookup (embtables.load adds "torchrec")


def fbgemm_nbit_available() -> bool:
    """FBGEMM's inference (IntNBit) TBE loads here."""
    return fbgemm_module_loads("split_table_batched_embeddings_ops_inference",
                               "IntNBitTableBatchedEmbeddingBagsCodegen")


def fbgemm_fits(table: dict, stored: dict[str, torch.Tensor]) -> bool:
    """IntNBit holds fp32 tables and row-wise int8/int4 with fp16 scale and bias; int4 rows need
    an even dim. (Binary codes have no FBGEMM format.)"""
    if table["precision"] == "none":
        return True
    if table["precision"] not in ("int8", "int4") or stored["scale"].dtype != torch.float16:
        return False
    return table["precision"] == "int8" or table["dim"] % 2 == 0


def intnbit_weights(table: dict, stored: dict[str, torch.Tensor], device: torch.device):
    """A table in FBGEMM IntNBit's layout, (row bytes, per-row [fp16 scale, fp16 bias] bytes or
    None for fp32), for any table `fbgemm_fits`: the same bytes, only the scales and the implied
    bias materialised per row."""
    rows = table["rows"]
    if table["precision"] == "none":  # fp32 rows as raw bytes, no scale/bias
        return stored["weight"].contiguous().view(torch.uint8).to(device), None
    bits = 8 if table["precision"] == "int8" else 4
    scale, bias = per_row_scale_bias(stored, bits, rows, rows_per_scale(table["dim"]))
    scale_bias = torch.cat([scale.view(torch.uint8).view(rows, 2), bias.view(torch.uint8).view(rows, 2)], 1)
    return stored["codes"].to(device), scale_bias.to(device)


class ServingLookup(nn.Module):
    """forward(values, offsets, per_sample_weights) → [B, Σ key dims], keys in the given order."""

    def __init__(self, tables: list[dict], stored: list[dict[str, torch.Tensor]], lookups: list,
                 backend: str = "auto", device: str | torch.device = "cpu"):
        super().__init__()
        if backend not in SERVING_BACKENDS:
            raise ValueError(f"unknown serving backend {backend!r}; choose one of {SERVING_BACKENDS}")
        device = torch.device(device)
        # On CUDA the IntNBit TBE needs the CUDA build of fbgemm_gpu (the CPU build imports but has no CUDA kernels).
        fbgemm_here = fbgemm_nbit_available() and (device.type != "cuda" or fbgemm_cuda_available())
        if backend == "fbgemm" and not fbgemm_here:
            raise RuntimeError(f"backend 'fbgemm' requested but fbgemm_gpu does not import here"
                               f"{' with CUDA kernels' if device.type == 'cuda' else ''}")
        self.tables = list(tables)
        index = {t["name"]: i for i, t in enumerate(self.tables)}
        unknown = [table for _, table in lookups if table not in index]
        if unknown:
            raise ExportError(f"lookups read tables {unknown} that the export does not hold")
        for t in self.tables:  # the grouping of scales is fixed by the dim; an export must agree
            if t.get("rows_per_scale") not in (None, rows_per_scale(t["dim"])):
                raise ExportError(f"table {t['name']!r}: {t['rows_per_scale']} rows per scale; this embtables "
                                  f"reads {rows_per_scale(t['dim'])} at dim {t['dim']}")
        self.key_table = [index[table] for _, table in lookups]
        self.key_dims = [self.tables[t]["dim"] for t in self.key_table]
        self._key_names = [self.tables[t]["name"] for t in self.key_table]
        self.register_buffer("_key_rows", torch.tensor([self.tables[t]["rows"] for t in self.key_table],
                                                        device=device), persistent=False)
        use_fbgemm = backend != "torch" and fbgemm_here
        # fp32 tables take the TBE too (one fused call instead of one embedding_bag per key).
        self.kinds = ["fbgemm" if use_fbgemm and fbgemm_fits(t, s) else "torch" for t, s in zip(tables, stored)]
        self.fbgemm_keys = [k for k, t in enumerate(self.key_table) if self.kinds[t] == "fbgemm"]
        self.tbe = self._build_tbe(stored, device) if self.fbgemm_keys else None
        # Torch-path tables stay as plain tensors (not parameters: nothing here trains).
        self._stored = [{role: v.to(device) for role, v in s.items()} if kind == "torch" else None
                        for s, kind in zip(stored, self.kinds)]

    @property
    def backends(self) -> list[str]:
        return list(self.kinds)

    def _build_tbe(self, stored, device: torch.device):
        from fbgemm_gpu.split_embedding_configs import SparseType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
            BoundsCheckMode, EmbeddingLocation, PoolingMode,
        )
        from fbgemm_gpu.split_table_batched_embeddings_ops_inference import IntNBitTableBatchedEmbeddingBagsCodegen

        group = [i for i, kind in enumerate(self.kinds) if kind == "fbgemm"]
        location = EmbeddingLocation.DEVICE if device.type == "cuda" else EmbeddingLocation.HOST
        types = {"none": SparseType.FP32, "int8": SparseType.INT8, "int4": SparseType.INT4}
        specs = [(self.tables[i]["name"], self.tables[i]["rows"], self.tables[i]["dim"],
                  types[self.tables[i]["precision"]], location) for i in group]
        tbe = IntNBitTableBatchedEmbeddingBagsCodegen(
            embedding_specs=specs, feature_table_map=[group.index(self.key_table[k]) for k in self.fbgemm_keys],
            pooling_mode=PoolingMode.SUM, output_dtype=SparseType.FP32, device=device,
            bounds_check_mode=BoundsCheckMode.NONE)  # `forward` checks (and raises) instead
        tbe.initialize_weights()
        tbe.assign_embedding_weights([intnbit_weights(self.tables[i], stored[i], device) for i in group])
        return tbe

    def forward(self, values: torch.Tensor, offsets: torch.Tensor,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        check_bounds(values, offsets, self._key_rows, self._key_names)
        keys = len(self.key_table)
        batch = (offsets.numel() - 1) // keys
        starts = offsets[::batch].tolist() if batch else [0] * (keys + 1)
        out: list[torch.Tensor | None] = [None] * keys
        for k, t in enumerate(self.key_table):
            if self.kinds[t] != "torch":
                continue
            lo, hi = starts[k], starts[k + 1]
            bags = offsets[k * batch:(k + 1) * batch + 1] - lo
            w = per_sample_weights[lo:hi] if per_sample_weights is not None else None
            out[k] = self._pool_torch(t, values[lo:hi], bags, w, batch)
        if self.fbgemm_keys:
            pooled = self._pool_fbgemm(values, offsets, per_sample_weights, starts, batch)
            if len(self.fbgemm_keys) == keys:  # already in key order: no split and re-join
                return pooled
            for k, part in zip(self.fbgemm_keys, pooled.split([self.key_dims[k] for k in self.fbgemm_keys], 1)):
                out[k] = part
        return torch.cat(out, dim=1)

    def _pool_torch(self, t: int, idx, bags, weights, batch: int) -> torch.Tensor:
        table, stored = self.tables[t], self._stored[t]
        if idx.numel() == 0:
            return torch.zeros(batch, table["dim"], device=bags.device)
        if table["precision"] == "none":
            weight, idx = stored["weight"], idx
        else:  # dequantize only the rows this batch reads
            weight = dequantize_table(stored, table["precision"], table["dim"], idx)
            idx = torch.arange(idx.numel(), device=idx.device)
        return F.embedding_bag(idx, weight, bags, mode="sum", per_sample_weights=weights, include_last_offset=True)

    def _pool_fbgemm(self, values, offsets, weights, starts, batch: int) -> torch.Tensor:
        """The FBGEMM keys' bags gathered into one IntNBit call."""
        idx, lens, ws = [], [], []
        for k in self.fbgemm_keys:
            lo, hi = starts[k], starts[k + 1]
            idx.append(values[lo:hi])
            lens.append(offsets[k * batch:(k + 1) * batch + 1].diff())
            if weights is not None:
                ws.append(weights[lo:hi])
        lengths = torch.cat(lens)
        new_offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=values.device)
        torch.cumsum(lengths, 0, out=new_offsets[1:])
        return self.tbe(torch.cat(idx).int(), new_offsets,
                        per_sample_weights=torch.cat(ws).float() if weights is not None else None)
