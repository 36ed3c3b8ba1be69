"""One fused pooled lookup over every physical table, whatever backend serves each table.

On CPU, `cpu_fused` serves every table with the compiled multi-threaded kernels (auto's
choice when they are built). Otherwise tables FBGEMM can hold go to one TBE call and the
rest (dims not a multiple of 4, or no FBGEMM at all) go to the torch reference. Callers see
one module with the TBE layout.
"""
from __future__ import annotations

import warnings
import zlib

import torch
from torch import nn

from embtables.kernels.cpu_fused import CpuFusedLookup, cpu_fused_available
from embtables.kernels.fbgemm_lookup import FbgemmLookup, fbgemm_available, fbgemm_supports
from embtables.kernels.optimizer import RowwiseAdagrad
from embtables.kernels.table_state import TableStateMixin
from embtables.kernels.torch_lookup import TorchLookup
from embtables.specs import TableSpec

BACKENDS = ("auto", "fbgemm", "torch", "cpu_fused")


def seeded_initial_weights(tables: list[TableSpec], seed: int) -> list[torch.Tensor]:
    """Each table's init from its own generator, so it does not depend on backend grouping."""
    weights = []
    for t in tables:
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(t.name.encode()))
        weights.append(t.init_weight(g))
    return weights


def choose_backends(tables: list[TableSpec], backend: str, device: str | torch.device = "cpu") -> list[str]:
    """The backend of each table. `auto`: cpu_fused on CPU when built (measured several times
    faster than TBE for the train step), else FBGEMM TBE where it imports, else torch."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown lookup backend {backend!r}; choose one of {BACKENDS}")
    on_cpu = torch.device(device).type == "cpu"
    if backend == "cpu_fused" and not on_cpu:
        raise ValueError("lookup backend 'cpu_fused' runs on CPU only; use 'fbgemm' (or 'auto') on GPU")
    if backend == "cpu_fused" or (backend == "auto" and on_cpu and cpu_fused_available()):
        if cpu_fused_available():
            return ["cpu_fused"] * len(tables)
        warnings.warn("lookup backend 'cpu_fused': the compiled kernels are not built (run "
                      "`pip install -e .` or `python setup.py build_ext --inplace`); using the torch reference")
        return ["torch"] * len(tables)
    use_fbgemm = backend == "fbgemm" or (backend == "auto" and fbgemm_available())
    if backend == "fbgemm" and not fbgemm_available():
        raise RuntimeError("backend 'fbgemm' requested but fbgemm_gpu does not import here")
    return ["fbgemm" if use_fbgemm and fbgemm_supports(t) else "torch" for t in tables]


class FusedLookup(TableStateMixin, nn.Module):
    """forward(indices, offsets, per_sample_weights) -> [B, Σ dims], bag groups in the given order.

    Bag group g (B bags) reads table `feature_tables[g]` (default: group i reads table i);
    several groups may read one table, each pooled on its own.
    """

    def __init__(self, tables: list[TableSpec], backend: str = "auto",
                 optimizer: RowwiseAdagrad | None = None, seed: int = 0,
                 device: str | torch.device = "cpu", feature_tables: list[int] | None = None):
        super().__init__()
        self.tables = list(tables)
        ftm = list(range(len(self.tables))) if feature_tables is None else list(feature_tables)
        self.feature_tables = ftm
        self.optimizer = optimizer or RowwiseAdagrad()
        initial = seeded_initial_weights(self.tables, seed)
        kinds = choose_backends(self.tables, backend, device)
        self.group_tables: list[list[int]] = []
        self.group_features: list[list[int]] = []
        groups = []
        for kind, cls in (("fbgemm", FbgemmLookup), ("cpu_fused", CpuFusedLookup), ("torch", TorchLookup)):
            ids = [i for i, k in enumerate(kinds) if k == kind]
            if not ids:
                continue
            local = {t: n for n, t in enumerate(ids)}
            feats = [f for f, t in enumerate(ftm) if t in local]
            kwargs = {"device": device} if kind == "fbgemm" else {}
            groups.append(cls([self.tables[i] for i in ids], self.optimizer,
                              initial=[initial[i] for i in ids],
                              feature_tables=[local[ftm[f]] for f in feats], **kwargs))
            self.group_tables.append(ids)
            self.group_features.append(feats)
        self.groups = nn.ModuleList(groups)
        dims = [self.tables[t].dim for t in ftm]
        starts = torch.tensor([0] + dims).cumsum(0).tolist()
        order = [c for feats in self.group_features for f in feats for c in range(starts[f], starts[f] + dims[f])]
        # Output columns come back grouped; this puts them in bag-group order.
        self.register_buffer("_column_order", torch.argsort(torch.tensor(order)), persistent=False)

    @property
    def backends(self) -> list[str]:
        names = [""] * len(self.tables)
        for ids, group in zip(self.group_tables, self.groups):
            for i in ids:
                names[i] = group.backend
        return names

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        if len(self.groups) == 1:
            return self.groups[0](indices, offsets, per_sample_weights)
        batch = (offsets.numel() - 1) // len(self.feature_tables)
        outs = []
        for feats, group in zip(self.group_features, self.groups):
            idx, off, psw = _select_tables(indices, offsets, per_sample_weights, feats, batch)
            outs.append(group(idx, off, psw))
        return torch.cat(outs, dim=1)[:, self._column_order]

    def table_weights(self) -> list[torch.Tensor]:
        return self._in_table_order(lambda g: g.table_weights())

    def optimizer_states(self) -> list[torch.Tensor]:
        return self._in_table_order(lambda g: g.optimizer_states())

    def _in_table_order(self, get) -> list[torch.Tensor]:
        out: list[torch.Tensor | None] = [None] * len(self.tables)
        for ids, group in zip(self.group_tables, self.groups):
            for i, t in zip(ids, get(group)):
                out[i] = t
        return out


def _select_tables(indices, offsets, weights, group_ids, batch):
    """The TBE inputs restricted to some bag groups (their bags stay group-major)."""
    idx_parts, len_parts, w_parts = [], [], []
    for i in group_ids:
        bag = offsets[i * batch:(i + 1) * batch + 1]
        lo, hi = int(bag[0]), int(bag[-1])
        idx_parts.append(indices[lo:hi])
        len_parts.append(bag.diff())
        if weights is not None:
            w_parts.append(weights[lo:hi])
    lengths = torch.cat(len_parts)
    new_offsets = torch.zeros(lengths.numel() + 1, dtype=offsets.dtype)
    torch.cumsum(lengths, 0, out=new_offsets[1:])
    return torch.cat(idx_parts), new_offsets, (torch.cat(w_parts) if weights is not None else None)
