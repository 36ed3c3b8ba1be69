"""An export's tables served by TorchRec's quantized EmbeddingBagCollection (`embtables.load(EX,
backend="torchrec")`): the inference module TorchRec users deploy, wrapped by each method's
remap and combine exactly as the default serving path wraps its lookup.

The stored bytes go in as they are: fp32 rows, int8/int4 codes with their per-row fp16 scale and
bias (materialised per row, FBGEMM's layout, as for our own IntNBit path). An int4 table of odd
dim is declared one column wider (its packed rows already end in a zero nibble) and cut back.
Tables TorchRec has no format for (binary codes, scales that overflow fp16) are dequantized
once to fp32, which gives the values the torch serving path computes.
"""
from __future__ import annotations

import torch
from torch import nn
from torchrec import EmbeddingBagConfig
from torchrec.modules.embedding_configs import DataType

from embtables.errors import ExportError
from embtables.kernels.torchrec_lookup import pooled_in_key_order
from embtables.serving.lookup import intnbit_weights
from embtables.serving.quantize import dequantize_table

DATA_TYPES = {"none": DataType.FP32, "int8": DataType.INT8, "int4": DataType.INT4}


def _as_torchrec(table: dict, stored: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor], int]:
    """(table, stored, declared dim) in a format TorchRec's quantized EBC holds."""
    native = table["precision"] == "none" or (
        table["precision"] in ("int8", "int4") and stored["scale"].dtype == torch.float16)
    if not native:
        weight = dequantize_table(stored, table["precision"], table["dim"])
        return {**table, "precision": "none"}, {"weight": weight}, table["dim"]
    odd_int4 = table["precision"] == "int4" and table["dim"] % 2
    return table, stored, table["dim"] + 1 if odd_int4 else table["dim"]


class TorchRecServingLookup(nn.Module):
    """forward(values, offsets, per_sample_weights) → [B, Σ key dims], keys in the given order
    (the ServingLookup interface), through one torchrec.quant EmbeddingBagCollection (`ebc`)."""

    def __init__(self, tables: list[dict], stored: list[dict[str, torch.Tensor]], lookups: list,
                 device: str | torch.device = "cpu"):
        super().__init__()
        from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection

        device = torch.device(device)
        names = [t["name"] for t in tables]
        unknown = [table for _, table in lookups if table not in names]
        if unknown:
            raise ExportError(f"lookups read tables {unknown} that the export does not hold")
        self.keys = [key for key, _ in lookups]
        dims = {t["name"]: t["dim"] for t in tables}
        self.key_dims = [dims[table] for _, table in lookups]
        configs, weights = [], {}
        for t, s in zip(tables, stored):
            t, s, declared = _as_torchrec(t, s)
            configs.append(EmbeddingBagConfig(name=t["name"], embedding_dim=declared, num_embeddings=t["rows"],
                                              feature_names=[k for k, n in lookups if n == t["name"]],
                                              data_type=DATA_TYPES[t["precision"]]))
            weights[t["name"]] = intnbit_weights(t, s, device)
        # Weighted, so per-sample weights (weighted multi-hot inputs) pass; unweighted bags weigh 1.
        self.ebc = QuantEmbeddingBagCollection(tables=[c for c in configs if c.feature_names], is_weighted=True,
                                               device=device, table_name_to_quantized_weights=weights)

    @property
    def backends(self) -> list[str]:
        return ["torchrec"] * len(self.keys)

    def forward(self, values: torch.Tensor, offsets: torch.Tensor,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        weights = None if per_sample_weights is None else per_sample_weights.float()
        return pooled_in_key_order(self.ebc, self.keys, self.key_dims, values, offsets, weights)
