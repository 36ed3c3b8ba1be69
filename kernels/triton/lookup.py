"""GPU lookup for the hashed methods: raw ids → [B, F, d] in one Triton kernel, Adagrad in backward.

`TritonFusedLookup(features, tables, dim)` replaces remap → pooled lookup → combine for methods
that describe their fused parts (Method.fused_parts): the derived rows are computed inside the kernel
(no expanded index tensors in the forward), the bag is pooled and the parts combined in the
same pass. Backward accumulates each touched row's gradient (duplicates merged, fixed order)
and applies row-wise Adagrad in place. Tables, init and state names match the pooled lookups (kernels/lookup.py), so
`lookup_state()` checkpoints move between the two.

Selected with embedding.backend "triton", or by "auto" on CUDA without the CUDA build of TBE
(embtables/fused_embeddings.py wraps it). On CPU it runs only under TRITON_INTERPRET=1 (tests).
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from embtables.jagged import kjt_offsets
from embtables.kernels.lookup import seeded_initial_weights
from embtables.kernels.optimizer import RowwiseAdagrad
from embtables.kernels.table_state import TableStateMixin
from embtables.kernels.triton.plan import Plan
from embtables.specs import FusedFeature, TableSpec

# Launch shapes: ids per chunk of a bag, sorted entries per chunk of a row's update, and warps per
# program (a program handles one bag or one row: little work each, so few warps keep more
# programs resident to hide the gather latency). These are the shapes the H200 run in
# RESULTS.md measured; a sweep over them is still to be run there.
LAUNCH = {"block_l": 16, "block_e": 32, "forward_warps": 4, "backward_warps": 4, "update_warps": 4}


def triton_available(device: str | torch.device = "cuda") -> bool:
    """Triton imports and can run here: a CUDA device, or the CPU interpreter when asked for."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if torch.device(device).type == "cuda":
        return torch.cuda.is_available()
    return os.environ.get("TRITON_INTERPRET") == "1"


def device_guard(device: torch.device):
    """Triton launches on the *current* CUDA device: make it the tensors' one (cuda:1 etc.)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class _Lookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor, module, ids, offsets, psw):
        with device_guard(ids.device):
            out, parts = module.pooled(ids, offsets, psw)
        ctx.module, ctx.training = module, module.training
        ctx.save_for_backward(ids, offsets, psw, parts)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        ids, offsets, psw, parts = ctx.saved_tensors
        if ctx.needs_input_grad[4]:
            raise NotImplementedError("the Triton lookup does not differentiate per-sample weights")
        if ctx.training:
            with device_guard(ids.device):
                ctx.module.apply_gradient(ids, offsets, psw, parts, grad_out.float().contiguous())
        return None, None, None, None, None


class TritonFusedLookup(TableStateMixin, nn.Module):
    """Raw ids of the features (in `features` order) → [B, F, dim], over `tables`."""

    backend = "triton"

    def __init__(self, features: list[FusedFeature], tables: list[TableSpec], dim: int,
                 optimizer: RowwiseAdagrad | None = None, seed: int = 0, device: str | torch.device = "cpu"):
        super().__init__()
        self.tables = list(tables)
        self.plan = Plan(features, self.tables, dim)
        self.optimizer = optimizer or RowwiseAdagrad()
        initial = seeded_initial_weights(self.tables, seed)  # the same rows make_lookup starts from
        self.register_buffer("weight", torch.cat([w.reshape(-1) for w in initial]).to(device))
        self.register_buffer("momentum", torch.zeros(self.plan.total_rows, device=device))
        for name, t in self.plan.tensors(device).items():
            self.register_buffer(f"_plan_{name}", t, persistent=False)
        self._anchor = nn.Parameter(torch.zeros(0, device=device))

    def _p(self, name: str) -> torch.Tensor:
        return getattr(self, f"_plan_{name}")

    # --- tables, like the pooled lookups ------------------------------------------------------------
    @property
    def backends(self) -> list[str]:
        return [self.backend] * len(self.tables)

    def table_weights(self) -> list[torch.Tensor]:
        return [self.weight[int(o):int(o) + t.rows * t.dim].view(t.rows, t.dim)
                for t, o in zip(self.tables, self.plan.table_offset)]

    def optimizer_states(self) -> list[torch.Tensor]:
        return [self.momentum[int(o):int(o) + t.rows] for t, o in zip(self.tables, self.plan.state_offset)]

    # --- the lookup ---------------------------------------------------------------------------
    def forward(self, ids) -> torch.Tensor:
        """Raw-id KJT (keys = the methods' features, in method order) → [B, F, d]."""
        offsets = kjt_offsets(ids).long().contiguous()
        values = ids.values().long().contiguous()
        psw = ids.weights_or_none()
        psw = None if psw is None else psw.float().contiguous()
        return _Lookup.apply(self._anchor, self, values, offsets, psw)

    def _sizes(self, offsets):
        n_features = len(self.plan.features)
        if (offsets.numel() - 1) % n_features:
            raise ValueError(f"offsets has {offsets.numel()} entries; expected {n_features}·B + 1")
        return (offsets.numel() - 1) // n_features, n_features

    def pooled(self, ids, offsets, psw):
        from embtables.kernels.triton.kernels import forward_kernel

        batch, n_features = self._sizes(offsets)
        plan, P, D = self.plan, self.plan.max_parts, self.plan.block_d
        out = torch.zeros(batch, n_features, plan.dim, device=self.weight.device)
        # each part's pooled vector, for MULT's backward (a one-element stand-in when no feature multiplies)
        parts = torch.zeros((batch, n_features, P, D) if plan.has_mult else (1,), device=self.weight.device)
        if batch:
            forward_kernel[(batch, n_features)](
                ids, offsets, psw if psw is not None else ids, self.weight, self._p("kind"), self._p("a"),
                self._p("b"), self._p("col"), self._p("weighted"), self._p("table"), self._p("n_parts"),
                self._p("op"), self._p("scramble"), self._p("has_scramble"), self._p("table_rows"),
                self._p("table_dim"), self._p("table_offset"), out, parts, batch, n_features, plan.dim,
                HAS_PSW=psw is not None, P=P, BLOCK_D=D, BLOCK_L=LAUNCH["block_l"], KINDS=plan.kinds,
                CODE_BITS=plan.code_bits, HAS_MULT=plan.has_mult, num_warps=LAUNCH["forward_warps"])
        return out, parts

    @torch.no_grad()
    def apply_gradient(self, ids, offsets, psw, parts, grad_out) -> None:
        from embtables.kernels.triton.kernels import expand_kernel, part_grad_kernel, update_kernel

        batch, n_features = self._sizes(offsets)
        plan, P, D = self.plan, self.plan.max_parts, self.plan.block_d
        if batch == 0 or ids.numel() == 0:
            return
        device = self.weight.device
        gparts = torch.empty(batch, n_features, P, D, device=device)
        part_grad_kernel[(batch, n_features)](
            grad_out, parts, self._p("col"), self._p("table"), self._p("n_parts"), self._p("op"),
            self._p("table_dim"), gparts, n_features, plan.dim, P=P, BLOCK_D=D, HAS_MULT=plan.has_mult,
            num_warps=LAUNCH["backward_warps"])
        entries = ids.numel() * P
        keys = torch.full((entries,), -1, dtype=torch.long, device=device)
        sources = torch.zeros(entries, dtype=torch.long, device=device)
        factors = torch.zeros(entries, device=device)
        expand_kernel[(batch, n_features)](
            ids, offsets, psw if psw is not None else ids, self._p("kind"), self._p("a"), self._p("b"),
            self._p("weighted"), self._p("table"), self._p("n_parts"), self._p("scramble"),
            self._p("has_scramble"), self._p("table_rows"), keys, sources, factors, batch, n_features,
            HAS_PSW=psw is not None, P=P, BLOCK_L=LAUNCH["block_l"], KINDS=plan.kinds, CODE_BITS=plan.code_bits,
            num_warps=LAUNCH["backward_warps"])
        live = torch.nonzero(keys >= 0).squeeze(1)
        sorted_keys, order = torch.sort(keys[live], stable=True)  # stable: a fixed summation order
        unique, counts = torch.unique_consecutive(sorted_keys, return_counts=True)
        seg = torch.zeros(unique.numel() + 1, dtype=torch.long, device=device)
        torch.cumsum(counts, 0, out=seg[1:])
        update_kernel[(unique.numel(),)](
            unique, seg, live[order].contiguous(), sources, factors, gparts, self.weight, self.momentum,
            self._p("table_dim"), self._p("table_offset"), self._p("state_offset"),
            self.optimizer.lr, self.optimizer.eps, BLOCK_D=D, BLOCK_E=LAUNCH["block_e"],
            num_warps=LAUNCH["update_warps"])
