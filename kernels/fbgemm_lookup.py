"""FBGEMM table-batched embedding (TBE) backend: every table in one fused kernel call.

Row-wise Adagrad runs inside the TBE backward (EXACT_ROWWISE_ADAGRAD), on CPU or CUDA.

Out-of-range ids raise an IndexError naming the table, as the other backends do. TBE's own
bounds check only logs and maps them to row 0 (its default WARNING mode); its FATAL mode raises
an opaque "Expected idx < num_rows" on CPU (and is a device-side assert on CUDA). So our check
runs before TBE and TBE's is off (NONE), which more than pays for ours on CPU
(benchmarks/fbgemm_bounds_check.py; figures in benchmarks/RESULTS.md, issue 13).
"""
from __future__ import annotations

import importlib

import torch
from torch import nn

from embtables.kernels.optimizer import RowwiseAdagrad, initial_weights
from embtables.specs import TableSpec


def fbgemm_module_loads(module: str, name: str) -> bool:
    """fbgemm_gpu imports (registering torch.ops.fbgemm) and `fbgemm_gpu.<module>` has `name`."""
    try:
        return hasattr(importlib.import_module(f"fbgemm_gpu.{module}"), name)
    except Exception:  # ImportError, or an undefined symbol from a mismatched build
        return False


def fbgemm_available() -> bool:
    """FBGEMM's training TBE loads here."""
    return fbgemm_module_loads("split_table_batched_embeddings_ops_training",
                               "SplitTableBatchedEmbeddingBagsCodegen")


# The pooled TBE forward dispatches to this op; the CUDA build registers a CUDA kernel for it, the
# CPU build (fbgemm-gpu-cpu) only a CPU one, although both import and expose the same Python API.
TBE_FORWARD_OP = "fbgemm::split_embedding_codegen_forward_unweighted_pt2_wrapper"


def fbgemm_cuda_available() -> bool:
    """The fbgemm_gpu that imports here is the CUDA build: its TBE forward has a CUDA kernel."""
    if not fbgemm_available():  # importing registers the fbgemm ops with the dispatcher
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(TBE_FORWARD_OP, "CUDA")
    except RuntimeError:  # the op is not registered at all (an fbgemm without the pt2 TBE)
        return False


def fbgemm_supports(table: TableSpec) -> bool:
    """TBE kernels need the row width to be a multiple of 4."""
    return table.dim % 4 == 0


def check_bounds(indices: torch.Tensor, offsets: torch.Tensor, group_rows: torch.Tensor,
                 group_names: list[str]) -> None:
    """IndexError naming the table if any id is outside [0, rows) of the table it reads.

    `offsets` spans G bag groups (keys) × B bags, key-major; group g reads a table of
    group_rows[g] rows named group_names[g]. One min/max per bag group, compared at once: 0.1 ms
    for 26 × 4096 ids, where a per-id limit tensor took 0.13 ms on a quiet machine but 3–40 ms
    under load (large temporaries). Two host syncs on CUDA (the group bounds, the verdict)."""
    batch = (offsets.numel() - 1) // len(group_names)
    if batch == 0 or indices.numel() == 0:
        return
    ends = offsets[::batch].tolist()
    groups = [g for g in range(len(ends) - 1) if ends[g + 1] > ends[g]]
    extremes = [torch.aminmax(indices[ends[g]:ends[g + 1]]) for g in groups]
    lo, hi = torch.stack([e.min for e in extremes]), torch.stack([e.max for e in extremes])
    bad = (lo < 0) | (hi >= group_rows[groups])
    if not bool(bad.any()):
        return
    g = groups[int(bad.nonzero()[0])]
    rows = int(group_rows[g])
    part = indices[ends[g]:ends[g + 1]]
    pos = ends[g] + int(((part < 0) | (part >= rows)).nonzero()[0])
    raise IndexError(f"table {group_names[g]!r}: index {int(indices[pos])} at position {pos} is out of "
                     f"range [0, {rows})")


class FbgemmLookup(nn.Module):
    backend = "fbgemm"

    def __init__(self, tables: list[TableSpec], optimizer: RowwiseAdagrad | None = None,
                 initial: list[torch.Tensor] | None = None, device: str | torch.device = "cpu",
                 feature_tables: list[int] | None = None):
        super().__init__()
        from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
            BoundsCheckMode, EmbeddingLocation, PoolingMode,
        )
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice, SplitTableBatchedEmbeddingBagsCodegen,
        )

        bad = [t.name for t in tables if not fbgemm_supports(t)]
        if bad:
            raise ValueError(f"FBGEMM TBE needs dims that are multiples of 4; tables {bad} are not")
        self.tables = list(tables)
        self.optimizer = optimizer or RowwiseAdagrad()
        device = torch.device(device)
        on_gpu = device.type == "cuda"
        location = EmbeddingLocation.DEVICE if on_gpu else EmbeddingLocation.HOST
        compute = ComputeDevice.CUDA if on_gpu else ComputeDevice.CPU
        self.tbe = SplitTableBatchedEmbeddingBagsCodegen(
            embedding_specs=[(t.rows, t.dim, location, compute) for t in self.tables],
            feature_table_map=feature_tables,  # None: group i reads table i
            optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
            learning_rate=self.optimizer.lr,
            eps=self.optimizer.eps,
            weights_precision=SparseType.FP32,
            pooling_mode=PoolingMode.SUM,
            device=device,
            bounds_check_mode=BoundsCheckMode.NONE,  # `forward` checks (and raises) instead
        )
        groups = range(len(self.tables)) if feature_tables is None else feature_tables
        self._group_names = [self.tables[t].name for t in groups]
        self.register_buffer("_group_rows", torch.tensor([self.tables[t].rows for t in groups], device=device),
                             persistent=False)
        with torch.no_grad():
            for weight, w in zip(self.tbe.split_embedding_weights(), initial_weights(self.tables, initial)):
                weight.copy_(w)

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        self.check_bounds(indices, offsets)
        return self.tbe(indices, offsets, per_sample_weights=per_sample_weights)

    def check_bounds(self, indices: torch.Tensor, offsets: torch.Tensor) -> None:
        check_bounds(indices, offsets, self._group_rows, self._group_names)

    def table_weights(self) -> list[torch.Tensor]:
        return list(self.tbe.split_embedding_weights())

    def optimizer_states(self) -> list[torch.Tensor]:
        # One state tensor per table for row-wise Adagrad: the per-row momentum.
        return [states[0].view(-1) for states in self.tbe.split_optimizer_states()]
