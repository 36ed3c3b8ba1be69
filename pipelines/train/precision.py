"""Mixed precision for the dense network: bf16 compute, fp32 master weights, fp32 loss.

Only the model's dense `network` runs under autocast (its matrix products in bf16, weights
stay fp32 and are cast per step); the embedding lookup, the methods' combine and the loss
stay fp32. It is applied with forward hooks, so the model and its checkpoints are unchanged,
and only while training: evaluation runs in fp32.
"""
from __future__ import annotations

import functools
import os
import platform
import time
import warnings
from pathlib import Path

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16", "auto")


def _cpuinfo() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.read_text() if cpuinfo.is_file() else ""


def _cpu_flags() -> set[str]:
    return set(_cpuinfo().split())


def cpu_description() -> dict:
    """The CPU model and its vector/matrix flags, for benchmark reports (speed differs by CPU)."""
    model = next((line.split(":", 1)[1].strip() for line in _cpuinfo().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"model": model, "cores": os.cpu_count(),
            "flags": sorted(f for f in _cpu_flags() if f.startswith(("avx2", "avx512", "amx")))}


@functools.cache
def bf16_supported(device_type: str = "cpu") -> bool:
    """bf16 autocast runs correctly here (oneDNN bf16 kernels on CPU, bf16 CUDA devices)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


# DLRM dense layer shapes (batch x in x out): a bottom layer, the interaction -> top layer, a wide top layer.
PROBE_SHAPES = ((1024, 512, 256), (1024, 479, 1024), (1024, 1024, 1024))
PROBE_MIN_SPEEDUP = 1.2  # a margin over fp32 so a noisy probe on a shared machine does not flip the choice
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _bf16_product(a, b):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return a @ b


def probe_matmuls(shapes=PROBE_SHAPES, repeats: int = 5) -> dict:
    """GFLOP/s of fp32 matrix products with and without bf16 autocast, at `shapes`.

    Autocast is timed as training runs it (fp32 tensors cast to bf16 per product). The two
    precisions alternate, so load from other processes on a shared machine hits both alike, and
    each keeps its best time of `repeats` (after a warm-up: oneDNN builds its kernel on the first call).
    One thread, per core figures: a multi-threaded product waits for its slowest thread, so one
    core taken by another process swamped the ratio (it read 0.99x..2.7x under load vs a steady 4.1x).
    """
    flops = fp32_s = bf16_s = 0.0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for rows, inner, cols in shapes:
            a, b = torch.randn(rows, inner), torch.randn(inner, cols)
            a @ b, _bf16_product(a, b)
            times = [(_seconds(lambda: a @ b), _seconds(lambda: _bf16_product(a, b))) for _ in range(repeats)]
            fp32_s += min(t[0] for t in times)
            bf16_s += min(t[1] for t in times)
            flops += 2 * rows * inner * cols
    finally:
        torch.set_num_threads(threads)
    return {"shapes": [list(s) for s in shapes], "threads": 1, "fp32_gflops": round(flops / fp32_s / 1e9, 1),
            "bf16_gflops": round(flops / bf16_s / 1e9, 1), "speedup": round(fp32_s / bf16_s, 2)}


@functools.cache
def bf16_probe(device_type: str = "cpu") -> dict:
    """Whether bf16 matrix products beat fp32 here, and the evidence (cached per process).

    CUDA bf16 devices count as fast. A CPU needs bf16 dot-product instructions (AVX512_BF16 or
    AMX; without them oneDNN emulates bf16 and it is slower) and then must win a short probe:
    AVX512_BF16 alone was measured both ways on different chips (~0.6x on one, 3.4-4.4x on an
    AMD EPYC), so the flags decide only whether to probe.
    """
    if not bf16_supported(device_type):
        return {"fast": False, "reason": "no bf16 kernels"}
    if device_type == "cuda":
        return {"fast": True, "reason": "cuda bf16 device"}
    flags = sorted(f for f in BF16_CPU_FLAGS if f in _cpu_flags())
    if not flags:
        return {"fast": False, "reason": "no AVX512_BF16 or AMX", "cpu_flags": flags}
    probe = probe_matmuls()
    fast = probe["speedup"] >= PROBE_MIN_SPEEDUP
    return {"fast": fast, "reason": f"probe: bf16 {probe['speedup']}x fp32 (needs {PROBE_MIN_SPEEDUP}x)",
            "cpu_flags": flags, "probe": probe}


def fast_bf16(device_type: str = "cpu") -> bool:
    """bf16 matrix products are measurably faster than fp32 here (see `bf16_probe`)."""
    return bf16_probe(device_type)["fast"]


def precision_record(precision: str, device_type: str = "cpu") -> dict:
    """What metrics.json records: the precision asked for, the one run, and why."""
    return {"requested": precision, "chosen": resolve_precision(precision, device_type),
            "bf16_check": bf16_probe(device_type) if precision != "fp32" else None}


def resolve_precision(precision: str, device_type: str = "cpu") -> str:
    """The precision to run: `auto` = bf16 where it is fast; bf16 falls back where unsupported."""
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if fast_bf16(device_type) else "fp32"
    if precision == "bf16" and not bf16_supported(device_type):
        warnings.warn("train.precision bf16: no bf16 kernels on this device; training in fp32")
        return "fp32"
    if precision == "bf16" and not fast_bf16(device_type):
        warnings.warn("train.precision bf16: bf16 matrix products are not faster than fp32 here "
                      f"({bf16_probe(device_type)['reason']}; train.precision: auto picks the faster one)")
    return precision


def autocast_network(model: nn.Module, precision: str, device_type: str = "cpu") -> str:
    """Run `model.network` under bf16 autocast while training; returns the precision in effect.

    The network's output is cast back to fp32, so the loss is computed in fp32.
    """
    precision = resolve_precision(precision, device_type)
    if precision == "fp32":
        return precision
    network = model.network
    for handle in getattr(network, "_autocast_handles", ()):  # idempotent across training stages
        handle.remove()
    active: list = []

    def enter(module, args):
        if module.training:
            ctx = torch.autocast(device_type, dtype=torch.bfloat16)
            ctx.__enter__()
            active.append(ctx)

    def leave(module, args, output):
        if active:  # always_call: also runs when forward raised, so autocast never leaks
            active.pop().__exit__(None, None, None)
            if isinstance(output, torch.Tensor):  # None when forward raised
                return output.float()
        return output

    network._autocast_handles = (network.register_forward_pre_hook(enter),
                                 network.register_forward_hook(leave, always_call=True))
    return precision
