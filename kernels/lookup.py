"""The one pooled-lookup protocol, and the one factory that knows the backends.

A `PooledLookup` takes the physical rows of every lookup key in FBGEMM's TBE layout (`values`
flat, `offsets` of length K·B + 1, key-major) and returns `[B, Σ key dims]`, keys in order.
Key k reads table `key_tables[k]`; several keys may read one table (multiplexing), each pooled
on its own. The device is fixed at construction: TBE allocates its tables there.

Backends (`embedding.backend`): `auto` picks, on CPU, the compiled kernels (cpu_fused) when
built, else FBGEMM TBE where it imports, else the torch reference; on CUDA, the CUDA build of
TBE, else Triton when the methods allow it, else torch. `triton` consumes raw ids (it fuses
the methods' remap and combine), so the model builder makes it a sibling of the pooled
collection; `resolve_backend` is the policy both use.
"""
from __future__ import annotations

import warnings
import zlib
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from embtables.errors import ConfigError
from embtables.kernels.cpu_fused import CpuFusedLookup, cpu_fused_available
from embtables.kernels.fbgemm_lookup import FbgemmLookup, fbgemm_available, fbgemm_cuda_available, fbgemm_supports
from embtables.kernels.optimizer import RowwiseAdagrad
from embtables.kernels.table_state import TableStateMixin
from embtables.kernels.torch_lookup import TorchLookup
from embtables.specs import TableSpec

BACKENDS = ("auto", "cpu_fused", "fbgemm", "torch", "triton")


@runtime_checkable
class PooledLookup(Protocol):
    tables: list                  # the physical tables, in the order of `key_tables` indices

    @property
    def backends(self) -> list[str]:  # the kernel serving each table
        ...

    def forward(self, values: torch.Tensor, offsets: torch.Tensor,
                weights: torch.Tensor | None = None) -> torch.Tensor:  # [B, Σ key dims]
        ...

    # State for checkpoints, by table name ("<table>.weight", "<table>.momentum"). The TorchRec
    # lookup (torchrec_lookup.py) keeps TorchRec's state instead: per-rank shards when sharded
    # (pipelines/train/dist_checkpoint.py); an export's lookup has nothing to train.
    def lookup_state(self) -> dict[str, torch.Tensor]:
        ...

    def load_lookup_state(self, state: dict[str, torch.Tensor]) -> None:
        ...


def seeded_initial_weights(tables: list[TableSpec], seed: int) -> list[torch.Tensor]:
    """Each table's init from its own generator, so it does not depend on backend grouping."""
    weights = []
    for t in tables:
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(t.name.encode()))
        weights.append(t.init_weight(g))
    return weights


def resolve_backend(backend: str, device: str | torch.device = "cpu", triton_ok: bool = False) -> str:
    """The backend `backend` means on `device` (triton_ok: the methods have fused parts), or a
    ConfigError saying why it cannot run here."""
    from embtables.kernels.triton.lookup import triton_available

    if backend not in BACKENDS:
        raise ConfigError(f"embedding.backend {backend!r} is unknown; choose one of {', '.join(BACKENDS)}")
    on_cuda = torch.device(device).type == "cuda"
    if backend == "auto":
        if not on_cuda:
            return "cpu_fused" if cpu_fused_available() else "fbgemm" if fbgemm_available() else "torch"
        if fbgemm_cuda_available():
            return "fbgemm"
        return "triton" if triton_ok and triton_available(device) else "torch"
    if backend == "cpu_fused" and on_cuda:
        raise ConfigError("embedding.backend 'cpu_fused' runs on CPU only; use 'fbgemm', 'triton' or 'auto' on GPU")
    if backend == "fbgemm" and not (fbgemm_cuda_available() if on_cuda else fbgemm_available()):
        raise ConfigError("embedding.backend 'fbgemm': fbgemm_gpu does not import here"
                          + (" with CUDA kernels" if on_cuda else ""))
    if backend == "triton" and not triton_available(device):
        raise ConfigError(f"embedding.backend 'triton' cannot run on {torch.device(device).type} here "
                          "(it needs triton and a CUDA device; TRITON_INTERPRET=1 for CPU tests)")
    if backend == "triton" and not triton_ok:
        raise ConfigError("embedding.backend 'triton' runs only methods that have a fused form "
                          "(Method.fused_parts: full, hash, qr, binary_code, multiplexed with the sum combiner)")
    return backend


def table_backends(tables: list[TableSpec], backend: str) -> list[str]:
    """The kernel serving each table for a resolved pooled backend: TBE takes the tables whose
    dims it supports (multiples of 4), the torch reference the rest."""
    if backend == "cpu_fused" and not cpu_fused_available():
        warnings.warn("lookup backend 'cpu_fused': the compiled kernels are not built (run "
                      "`pip install -e .` or `python setup.py build_ext --inplace`); using the torch reference")
        return ["torch"] * len(tables)
    if backend == "fbgemm":
        return ["fbgemm" if fbgemm_supports(t) else "torch" for t in tables]
    return [backend] * len(tables)


def make_lookup(tables: list[TableSpec], key_tables: list[int] | None = None, backend: str = "auto",
                device: str | torch.device = "cpu", optimizer: RowwiseAdagrad | None = None,
                seed: int = 0) -> "TableGroupLookup":
    """The pooled lookup over `tables` (key k reads table key_tables[k]; default: key i, table i)."""
    if backend == "triton":
        raise ConfigError("the Triton lookup reads raw ids; build it with the methods (FusedMethodEmbeddings)")
    kind = resolve_backend(backend, device)
    return TableGroupLookup(tables, table_backends(tables, kind), key_tables, optimizer, seed, device)


class TableGroupLookup(TableStateMixin, nn.Module):
    """A PooledLookup whose tables are split into groups by kernel (TBE, compiled CPU, torch):
    one call per group, the groups' columns put back in key order."""

    def __init__(self, tables: list[TableSpec], kinds: list[str], key_tables: list[int] | None = None,
                 optimizer: RowwiseAdagrad | None = None, seed: int = 0, device: str | torch.device = "cpu"):
        super().__init__()
        self.tables = list(tables)
        key_tables = list(range(len(self.tables))) if key_tables is None else list(key_tables)
        self.key_tables = key_tables
        self.optimizer = optimizer or RowwiseAdagrad()
        initial = seeded_initial_weights(self.tables, seed)
        self.group_tables: list[list[int]] = []
        self.group_keys: list[list[int]] = []
        groups = []
        for kind, cls in (("fbgemm", FbgemmLookup), ("cpu_fused", CpuFusedLookup), ("torch", TorchLookup)):
            ids = [i for i, k in enumerate(kinds) if k == kind]
            if not ids:
                continue
            local = {t: n for n, t in enumerate(ids)}
            keys = [k for k, t in enumerate(key_tables) if t in local]
            placed = {} if kind == "cpu_fused" else {"device": device}
            groups.append(cls([self.tables[i] for i in ids], self.optimizer, initial=[initial[i] for i in ids],
                              feature_tables=[local[key_tables[k]] for k in keys], **placed))
            self.group_tables.append(ids)
            self.group_keys.append(keys)
        self.groups = nn.ModuleList(groups)
        dims = [self.tables[t].dim for t in key_tables]
        starts = torch.tensor([0] + dims).cumsum(0).tolist()
        order = [c for keys in self.group_keys for k in keys for c in range(starts[k], starts[k] + dims[k])]
        # Output columns come back grouped; this puts them in key order.
        self.register_buffer("_column_order", torch.argsort(torch.tensor(order, device=device)), persistent=False)

    @property
    def backends(self) -> list[str]:
        names = [""] * len(self.tables)
        for ids, group in zip(self.group_tables, self.groups):
            for i in ids:
                names[i] = group.backend
        return names

    def forward(self, values: torch.Tensor, offsets: torch.Tensor,
                weights: torch.Tensor | None = None) -> torch.Tensor:
        if len(self.groups) == 1:
            return self.groups[0](values, offsets, weights)
        batch = (offsets.numel() - 1) // len(self.key_tables)
        outs = []
        for keys, group in zip(self.group_keys, self.groups):
            outs.append(group(*_select_keys(values, offsets, weights, keys, batch)))
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


def _select_keys(values, offsets, weights, keys, batch):
    """The TBE inputs restricted to some keys (their bags stay key-major)."""
    idx_parts, len_parts, w_parts = [], [], []
    for k in keys:
        bag = offsets[k * batch:(k + 1) * batch + 1]
        lo, hi = int(bag[0]), int(bag[-1])
        idx_parts.append(values[lo:hi])
        len_parts.append(bag.diff())
        if weights is not None:
            w_parts.append(weights[lo:hi])
    lengths = torch.cat(len_parts)
    new_offsets = torch.zeros(lengths.numel() + 1, dtype=offsets.dtype, device=offsets.device)
    torch.cumsum(lengths, 0, out=new_offsets[1:])
    return torch.cat(idx_parts), new_offsets, (torch.cat(w_parts) if weights is not None else None)
