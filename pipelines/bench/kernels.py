"""`embtables bench kernels`: the fused lookup alone — torch reference vs FBGEMM TBE (CPU) vs ours.

Shapes default to the acceptance set: 26 tables × 200k rows, dims 16/64/128, batch 4096, one
Zipf(1.15)-distributed id per bag (rank = id: our vocabularies are in descending frequency).
Per backend and dim: forward ms (no grad) and train-step ms (forward + backward with the
row-wise Adagrad update), each the median (and best) over `--iters` steps after `--warmup`,
cycling over a few batches; FBGEMM and ours are timed interleaved, step by step, so both see
the same machine load. GB/s from the bytes a step must move at least, and that as a fraction
of measured memory-copy bandwidth. Every backend starts from the same weights and sees the
same batches and output gradients; the largest differences to FBGEMM are reported.
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import time

import torch

from embtables.kernels import RowwiseAdagrad
from embtables.kernels.cpu_fused import CpuFusedLookup, cpu_fused_available
from embtables.kernels.fbgemm_lookup import FbgemmLookup, fbgemm_available
from embtables.kernels.torch_lookup import TorchLookup
from embtables.pipelines.train.precision import cpu_description
from embtables.specs import TableSpec

CLASSES = {"torch": TorchLookup, "fbgemm": FbgemmLookup, "cpu_fused": CpuFusedLookup}
CHECK_STEPS = 3  # steps replayed on every backend from the same start to compare results
SWEEP_AXES = ("tables", "rows", "pooling")


def sweep_arg(text: str) -> tuple[str, list[int]]:
    """`AXIS=V1,V2,...` (AXIS one of SWEEP_AXES; values may be written 1e6)."""
    axis, _, values = text.partition("=")
    try:
        numbers = [int(float(v)) for v in values.split(",") if v.strip()]
    except ValueError:
        numbers = []
    if axis not in SWEEP_AXES or not numbers or min(numbers) < 1:
        raise argparse.ArgumentTypeError(f"expected AXIS=V1,V2,... with AXIS one of {', '.join(SWEEP_AXES)} "
                                         f"and positive whole numbers, got {text!r}")
    return axis, numbers


def add_kernel_args(parser) -> None:
    parser.add_argument("--tables", type=int, default=26)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dims", default="16,64,128", help="comma-separated embedding dims")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--pooling", type=int, default=1, help="ids per bag")
    parser.add_argument("--zipf", type=float, default=1.15, help="Zipf exponent of the ids")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batches", type=int, default=4, help="distinct batches cycled over")
    parser.add_argument("--backends", default="torch,fbgemm,cpu_fused")
    parser.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: all cores)")
    parser.add_argument("--copy-mb", type=int, default=256, help="buffer size of the memory-copy reference")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sweep", type=sweep_arg, action="append", default=[], metavar="AXIS=V1,V2,...",
                        help="scaling table: run the shape once per value of AXIS (tables, rows or pooling), "
                             "the other settings as given; repeatable; only the sweeps' shapes run")


def zipf_ids(n: int, rows: int, exponent: float, generator: torch.Generator) -> torch.Tensor:
    """n ids in [0, rows) with P(id = k) ∝ (k + 1)^-exponent (inverse-CDF sampling)."""
    p = torch.arange(1, rows + 1, dtype=torch.float64).pow(-exponent)
    cdf = (p / p.sum()).cumsum(0)
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    return torch.searchsorted(cdf, u).clamp_max(rows - 1)


def make_batches(args) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(args.seed)
    bags = args.tables * args.batch
    offsets = torch.arange(bags + 1) * args.pooling
    return [(zipf_ids(bags * args.pooling, args.rows, args.zipf, g), offsets) for _ in range(args.batches)]


def step_bytes(batches, args, dim: int) -> tuple[float, float]:
    """Least bytes moved per step, averaged over the batches: (forward, train step).

    Forward: every looked-up row read once, indices and offsets read, output written.
    Train step: forward + output gradient read, indices/offsets read again, and each unique
    row's weights and momentum read and written once.
    """
    fwd, train = [], []
    for indices, offsets in batches:
        inputs = indices.numel() * 8 + offsets.numel() * 8
        out = args.batch * args.tables * dim * 4
        f = indices.numel() * dim * 4 + inputs + out
        per_table = indices.view(args.tables, -1)
        unique = sum(int(torch.unique(row).numel()) for row in per_table)
        fwd.append(f)
        train.append(f + out + inputs + unique * (dim * 4 + 4) * 2)
    return sum(fwd) / len(fwd), sum(train) / len(train)


def memcpy_gbps(mb: int = 256, repeats: int = 5) -> float:
    """Copy bandwidth, counting bytes read + written, best of `repeats` (the reference ceiling)."""
    src = torch.ones(mb * 2**20 // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best / 1e9


def _timings(lookups: dict, batches, grads, args) -> dict:
    """Forward and train-step times of the lookups, interleaved step by step (they share any
    load the machine has); median and best (min) over `iters` after `warmup`."""
    def forward(lookup, i):
        with torch.no_grad():
            lookup(*batches[i % len(batches)])

    def train_step(lookup, i):
        lookup(*batches[i % len(batches)]).backward(grads[i % len(grads)])

    out = {name: {} for name in lookups}
    for label, fn in (("forward", forward), ("train_step", train_step)):
        times = {name: [] for name in lookups}
        for i in range(args.warmup + args.iters):
            for name, lookup in lookups.items():
                tick = time.perf_counter()
                fn(lookup, i)
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - tick)
        for name, t in times.items():
            out[name][f"{label}_ms"] = 1e3 * statistics.median(t)
            out[name][f"{label}_ms_best"] = 1e3 * min(t)
    return out


def replay(lookup, batches, grads) -> tuple[list, list]:
    """The same few steps from the same start on every backend: outputs and touched rows."""
    outputs = []
    for step in range(CHECK_STEPS):
        indices, offsets = batches[step % len(batches)]
        out = lookup(indices, offsets)
        out.backward(grads[step % len(grads)])
        outputs.append(out.detach())
    touched = torch.unique(torch.cat([b[0] for b in batches[:CHECK_STEPS]]))
    return outputs, [w[touched].clone() for w in lookup.table_weights()]


def bench_dim(dim: int, args, batches, copy_gbps: float) -> dict:
    tables = [TableSpec(f"t{i}", args.rows, dim) for i in range(args.tables)]
    g = torch.Generator().manual_seed(args.seed + dim)
    initial = [t.init_weight(g) for t in tables]
    grads = [torch.randn(args.batch, args.tables * dim, generator=g) for _ in range(2)]
    fwd_bytes, train_bytes = step_bytes(batches, args, dim)
    out: dict = {"forward_bytes": fwd_bytes, "train_step_bytes": train_bytes}
    checks = {}
    # The slow torch reference on its own; FBGEMM and ours side by side (interleaved timing).
    rounds = [[n] for n in args.backend_list if n == "torch"] + [[n for n in args.backend_list if n != "torch"]]
    for names in filter(None, rounds):
        lookups = {n: CLASSES[n](tables, RowwiseAdagrad(lr=0.05), initial=initial) for n in names}
        for name, lookup in lookups.items():
            checks[name] = replay(lookup, batches, grads)
        out.update(_timings(lookups, batches, grads, args))
        del lookups
        gc.collect()
    del initial
    gc.collect()
    for name in args.backend_list:
        result = out[name]
        result["forward_gbps"] = fwd_bytes / result["forward_ms"] / 1e6
        result["train_step_gbps"] = train_bytes / result["train_step_ms"] / 1e6
        result["forward_bw_fraction"] = result["forward_gbps"] / copy_gbps
        result["train_step_bw_fraction"] = result["train_step_gbps"] / copy_gbps
        print(f"dim {dim:4d} {name:10s} forward {result['forward_ms']:8.2f} ms   "
              f"train step {result['train_step_ms']:8.2f} ms (best {result['train_step_ms_best']:.2f})   "
              f"({result['train_step_gbps']:.2f} GB/s, {result['train_step_bw_fraction']:.0%} of copy)", flush=True)
    if "fbgemm" in checks:
        ref_out, ref_state = checks["fbgemm"]
        for name, (outputs, state) in checks.items():
            if name == "fbgemm":
                continue
            out[name]["max_abs_diff_vs_fbgemm"] = {
                "outputs": max(float((a - b).abs().max()) for a, b in zip(outputs, ref_out)),
                "weights": max(float((a - b).abs().max()) for a, b in zip(state, ref_state))}
            out[f"speedup_vs_fbgemm_train_step_{name}"] = out["fbgemm"]["train_step_ms"] / out[name]["train_step_ms"]
            out[f"speedup_vs_fbgemm_forward_{name}"] = out["fbgemm"]["forward_ms"] / out[name]["forward_ms"]
    return out


def bench_shape(args, copy_gbps: float) -> dict:
    """Every dim of one shape (tables, rows, batch, pooling): the per-dim reports."""
    batches = make_batches(args)
    return {str(dim): bench_dim(dim, args, batches, copy_gbps) for dim in args.dim_list}


def run_sweeps(args, copy_gbps: float) -> dict:
    """One axis at a time from the given shape: how each cost grows with the work."""
    sweeps = {}
    for axis, values in args.sweep:
        points = []
        for value in values:
            shape = copy.copy(args)
            setattr(shape, axis, value)
            print(f"-- {axis} = {value:,}", flush=True)
            points.append({axis: value, "load_average": os.getloadavg()[0], "by_dim": bench_shape(shape, copy_gbps)})
        sweeps[axis] = points
    return sweeps


def run_kernel_bench(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in wanted if b not in CLASSES]
    if unknown:
        raise ValueError(f"--backends: unknown {unknown}; choose from {sorted(CLASSES)}")
    available = {"torch": True, "fbgemm": fbgemm_available(), "cpu_fused": cpu_fused_available()}
    args.backend_list = [b for b in wanted if available[b]]
    skipped = [b for b in wanted if not available[b]]
    dims = args.dim_list = [int(d) for d in str(args.dims).split(",")]
    load_before = os.getloadavg()
    copy_gbps = memcpy_gbps(args.copy_mb)
    cpu = cpu_description()
    print(f"{cpu['model']} ({', '.join(f for f in cpu['flags'] if 'bf16' in f or 'amx' in f) or 'no bf16/amx'}); "
          f"memory copy {copy_gbps:.1f} GB/s (read + write); load average {load_before[0]:.2f}; "
          f"{torch.get_num_threads()} threads", flush=True)
    report = {
        "shape": {"tables": args.tables, "rows": args.rows, "dims": dims, "batch": args.batch,
                  "pooling": args.pooling, "zipf": args.zipf, "iters": args.iters, "warmup": args.warmup},
        "cpu": cpu, "threads": torch.get_num_threads(), "memcpy_gbps": copy_gbps,
        "backends": args.backend_list,
        "skipped_backends": skipped, "load_average_before": list(load_before),
    }
    if args.sweep:
        report["sweeps"] = run_sweeps(args, copy_gbps)
        report["load_average_after"] = list(os.getloadavg())
        return report
    report["by_dim"] = bench_shape(args, copy_gbps)
    report["load_average_after"] = list(os.getloadavg())
    headline = report["by_dim"][str(dims[0])]
    if "speedup_vs_fbgemm_train_step_cpu_fused" in headline:
        report["speedup_vs_fbgemm_train_step"] = headline["speedup_vs_fbgemm_train_step_cpu_fused"]
        report["speedup_vs_fbgemm_forward"] = headline["speedup_vs_fbgemm_forward_cpu_fused"]
        report["speedup_vs_fbgemm_train_step_by_dim"] = {
            d: r["speedup_vs_fbgemm_train_step_cpu_fused"] for d, r in report["by_dim"].items()}
    return report
