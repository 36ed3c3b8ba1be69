"""Fast CPU backend: one multi-threaded C++ call for the pooled forward of every table, one for
the backward with duplicate rows merged and row-wise Adagrad applied in place.

The kernels (kernels/csrc/: cpu_fused.cpp, interaction.cpp, parallel.h) are built by setup.py
as `embtables.kernels._cpu_fused` (`pip install -e .`, or `python setup.py build_ext --inplace`)
and called through ctypes, so they need no torch headers. When the library is missing,
`cpu_fused_available()` is False and make_lookup falls back to the torch reference.
"""
from __future__ import annotations

import ctypes
import functools
import importlib

import torch
from torch import nn

from embtables.kernels.host_memory import ReusedOutputs, hugepage_empty
from embtables.kernels.optimizer import RowwiseAdagrad, initial_weights
from embtables.specs import TableSpec

_P, _I, _F, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int


@functools.cache
def _library() -> ctypes.CDLL | None:
    try:
        module = importlib.import_module("embtables.kernels._cpu_fused")
        lib = ctypes.CDLL(module.__file__)
    except (ImportError, OSError):
        return None
    lib.embtables_pooled_forward.restype = _I
    lib.embtables_pooled_forward.argtypes = [_I, _I, _P, _P, _P, _P, _P, _P, _P, _P, _I, _P, _INT]
    lib.embtables_backward_adagrad.restype = None
    lib.embtables_backward_adagrad.argtypes = [_I, _I, _P, _P, _P, _P, _I, _P, _P, _P, _P, _P, _I, _P,
                                               _F, _F, _INT]
    lib.embtables_pairwise_dots_backward.restype = _INT
    lib.embtables_pairwise_dots_backward.argtypes = [_I, _I, _I, _P, _P, _P, _INT]
    return lib


def cpu_fused_available() -> bool:
    return _library() is not None


GRAIN = 32768  # floats of work per thread below which a parallel region costs more than it saves


def threads_for(work: int) -> int:
    """Threads for `work` floats moved: one for small calls (as ATen's grain size), else all."""
    return max(1, min(torch.get_num_threads(), work // GRAIN))


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class _PooledLookup(torch.autograd.Function):
    """Forward: pooled sums. Backward: the table update itself (nothing flows to the tables)."""

    @staticmethod
    def forward(ctx, anchor, module, indices, offsets, psw):
        out = module.pooled(indices, offsets, psw)
        ctx.module, ctx.training = module, module.training
        ctx.save_for_backward(indices, offsets, psw)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        indices, offsets, psw = ctx.saved_tensors
        grad_out = grad_out.float().contiguous()
        grad_psw = None
        if psw is not None and ctx.needs_input_grad[4]:
            grad_psw = ctx.module.per_sample_weight_grad(indices, offsets, grad_out)  # before the update
        if ctx.training:
            ctx.module.apply_gradient(indices, offsets, None if psw is None else psw.detach(), grad_out)
        return None, None, None, None, grad_psw


class CpuFusedLookup(nn.Module):
    """Pooled (sum) lookup over many tables with row-wise Adagrad fused into backward (CPU).

    Same inputs, outputs and update rule as TorchLookup. `feature_tables` maps each bag
    group of the input to the table it reads (default: group i reads table i); groups that
    share a table have their gradients merged before the table's one update per step.
    """

    backend = "cpu_fused"

    def __init__(self, tables: list[TableSpec], optimizer: RowwiseAdagrad | None = None,
                 initial: list[torch.Tensor] | None = None, feature_tables: list[int] | None = None):
        super().__init__()
        if _library() is None:
            raise RuntimeError("cpu_fused kernels are not built; see embtables.kernels.cpu_fused")
        self.tables = list(tables)
        self.optimizer = optimizer or RowwiseAdagrad()
        for i, w in enumerate(initial_weights(self.tables, initial)):
            self.register_buffer(f"weight_{i}", hugepage_empty(*w.shape).copy_(w.detach()))
            self.register_buffer(f"momentum_{i}", torch.zeros(self.tables[i].rows))
        self.feature_tables = list(range(len(self.tables))) if feature_tables is None else list(feature_tables)
        if any(not 0 <= t < len(self.tables) for t in self.feature_tables):
            raise ValueError(f"feature_tables {self.feature_tables} must index the {len(self.tables)} tables")
        dims = [self.tables[t].dim for t in self.feature_tables]
        self.out_dim = sum(dims)
        self._mean_dim = max(1, self.out_dim // len(dims))
        self.register_buffer("_feature_table", torch.tensor(self.feature_tables, dtype=torch.long), persistent=False)
        self.register_buffer("_out_cols", torch.tensor([0] + dims[:-1]).cumsum(0), persistent=False)
        self.register_buffer("_rows", torch.tensor([t.rows for t in self.tables]), persistent=False)
        self.register_buffer("_dims", torch.tensor([t.dim for t in self.tables]), persistent=False)
        # Gives autograd a leaf to reach, so backward (the update) runs; it holds no data.
        self._anchor = nn.Parameter(torch.zeros(0))
        self._outputs = ReusedOutputs()
        self._table_buffer_names = [f"weight_{i}" for i in range(len(self.tables))] + \
                                   [f"momentum_{i}" for i in range(len(self.tables))]
        self._address_key, self._address_arrays = None, None

    def table_weights(self) -> list[torch.Tensor]:
        return [getattr(self, f"weight_{i}") for i in range(len(self.tables))]

    def optimizer_states(self) -> list[torch.Tensor]:
        return [getattr(self, f"momentum_{i}") for i in range(len(self.tables))]

    def _addresses(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The tables' and the optimizer states' addresses as the kernels take them. Checked per
        call (a buffer may have been replaced: `.to()`, assignment), rebuilt only when changed."""
        buffers = self._buffers
        key = tuple(buffers[name].data_ptr() for name in self._table_buffer_names)
        if key != self._address_key:
            n = len(self.tables)
            self._address_key = key
            self._address_arrays = (torch.tensor(key[:n]), torch.tensor(key[n:]))
        return self._address_arrays

    def _inputs(self, indices, offsets, psw):
        n_groups = len(self.feature_tables)
        if (offsets.numel() - 1) % n_groups:
            raise ValueError(f"offsets has {offsets.numel()} entries; expected {n_groups}·B + 1")
        if indices.device.type != "cpu" or self.weight_0.device.type != "cpu":
            raise RuntimeError("lookup backend 'cpu_fused' runs on CPU only; use 'fbgemm' or 'triton' on GPU")
        indices = indices.long().contiguous()
        offsets = offsets.long().contiguous()
        if psw is not None:
            psw = psw.float().contiguous()
        return indices, offsets, psw, (offsets.numel() - 1) // n_groups

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        return _PooledLookup.apply(self._anchor, self, indices, offsets, per_sample_weights)

    def pooled(self, indices, offsets, psw) -> torch.Tensor:
        indices, offsets, psw, batch = self._inputs(indices, offsets, psw)
        out = self._outputs.empty(batch, self.out_dim)
        ptrs, _ = self._addresses()
        bad = _library().embtables_pooled_forward(
            len(self.feature_tables), batch, indices.data_ptr(), offsets.data_ptr(), _ptr(psw),
            self._feature_table.data_ptr(), ptrs.data_ptr(), self._rows.data_ptr(), self._dims.data_ptr(),
            self._out_cols.data_ptr(), self.out_dim, out.data_ptr(), threads_for(indices.numel() * self._mean_dim))
        if bad >= 0:
            group = int(torch.searchsorted(offsets, torch.tensor(bad), right=True)) - 1
            table = self.tables[self.feature_tables[group // batch]]
            raise IndexError(f"table {table.name!r}: index {int(indices[bad])} at position {bad} is out of "
                             f"range [0, {table.rows})")
        return out

    def apply_gradient(self, indices, offsets, psw, grad_out) -> None:
        indices, offsets, psw, batch = self._inputs(indices, offsets, psw)
        ptrs, states = self._addresses()
        _library().embtables_backward_adagrad(
            len(self.feature_tables), batch, indices.data_ptr(), offsets.data_ptr(), _ptr(psw),
            self._feature_table.data_ptr(), len(self.tables), ptrs.data_ptr(), states.data_ptr(),
            self._rows.data_ptr(), self._dims.data_ptr(), self._out_cols.data_ptr(), grad_out.shape[1],
            grad_out.data_ptr(), self.optimizer.lr, self.optimizer.eps, threads_for(indices.numel() * self._mean_dim))

    def per_sample_weight_grad(self, indices, offsets, grad_out) -> torch.Tensor:
        """d loss / d psw[p] = <grad_out[bag(p), cols], W[indices[p]]> (rare: learnable weights)."""
        indices, offsets, _, batch = self._inputs(indices, offsets, None)
        lengths = offsets.diff()
        bag = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
        group, b = bag // batch, bag % batch
        out = torch.empty(indices.numel())
        weights = self.table_weights()
        for g, t in enumerate(self.feature_tables):
            mask = group == g
            col, dim = int(self._out_cols[g]), self.tables[t].dim
            out[mask] = (grad_out[b[mask], col:col + dim] * weights[t][indices[mask]]).sum(1)
        return out
