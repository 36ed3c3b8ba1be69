"""Mixed precision for the dense network: bf16 compute, fp32 master weights, fp32 loss.

Only the model's dense `network` runs under autocast (its matrix products in bf16, weights
stay fp32 and are cast per step); the embedding lookup, the methods' combine and the loss
stay fp32. It is applied with forward hooks, so the model and its checkpoints are unchanged,
and only while training: evaluation runs in fp32.
"""
from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16", "auto")


def _cpu_flags() -> set[str]:
    cpuinfo = Path("/proc/cpuinfo")
    return set(cpuinfo.read_text().split()) if cpuinfo.is_file() else set()


@functools.cache
def bf16_supported(device_type: str = "cpu") -> bool:
    """bf16 autocast runs correctly here (oneDNN bf16 kernels on CPU, bf16 CUDA devices)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


@functools.cache
def fast_bf16(device_type: str = "cpu") -> bool:
    """bf16 matrix products beat fp32 here: CUDA, or a CPU with AMX tiles.

    Measured on an AVX512-BF16 CPU without AMX: bf16 GEMMs ran at ~77 GFLOP/s per core vs
    ~130 for fp32, so AVX512-BF16 alone does not count as fast.
    """
    if not bf16_supported(device_type):
        return False
    return device_type == "cuda" or "amx_bf16" in _cpu_flags()


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
        warnings.warn("train.precision bf16: this CPU has no AMX, bf16 matrix products are likely slower "
                      "than fp32 here (train.precision: auto picks the faster one)")
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
