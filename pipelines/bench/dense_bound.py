"""The dense network's own ceiling: DLRM's MLPs and interaction alone, embeddings free.

A train step can never be faster than its dense part, so `samples/s of the dense part alone`
bounds any end-to-end figure, and dividing it by TorchRec's samples/s bounds the speedup any
lookup work can buy on this machine. Measured with the same DLRM module and dense Adagrad the
training uses, on random inputs (the embedded vectors require grad, as they do in training),
next to the machine's matrix-product rate at the first top-layer's shape.
"""
from __future__ import annotations

import time

import torch

from embtables.models.dlrm import DLRM
from embtables.pipelines.train.local import make_optimizer, update


def mlp_flops_per_sample(n_dense: int, n_sparse: int, dim: int, bottom: list[int], top: list[int]) -> int:
    """FLOPs (2 per multiply-add) of the MLPs' forward + backward: each layer's product three
    times (output, input gradient, weight gradient) but the first layer's input gradient (dense
    inputs need none)."""
    n_vectors = n_sparse + 1
    bottom_sizes = [n_dense, *bottom, dim]
    top_sizes = [n_vectors * (n_vectors - 1) // 2 + dim, *top, 1]
    macs = [a * b for sizes in (bottom_sizes, top_sizes) for a, b in zip(sizes, sizes[1:])]
    return 2 * (3 * sum(macs) - macs[0])


def dlrm_flops_per_sample(n_dense: int, n_sparse: int, dim: int, bottom: list[int], top: list[int]) -> int:
    """The MLPs plus the interaction's two batched products (the Gram matrix V·Vᵀ forward, and
    (G + Gᵀ)·V backward)."""
    n_vectors = n_sparse + 1
    return mlp_flops_per_sample(n_dense, n_sparse, dim, bottom, top) + 2 * 2 * n_vectors * n_vectors * dim


def _time(step, steps: int) -> float:
    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def matmul_gflops(rows: int, inner: int, cols: int, dtype: torch.dtype, steps: int = 20) -> float:
    a, b = torch.randn(rows, inner, dtype=dtype), torch.randn(inner, cols, dtype=dtype)
    return 2 * rows * inner * cols / _time(lambda: a @ b, steps) / 1e9


def dense_bound(n_dense: int, n_sparse: int, dim: int, bottom: list[int], top: list[int], batch: int,
                precision: str = "fp32", steps: int = 20, seed: int = 0, lr: float = 0.01) -> dict:
    """ms per step and samples/s of the dense part alone (fwd + bwd + Adagrad)."""
    torch.manual_seed(seed)
    model = DLRM(n_dense, n_sparse, dim, bottom, top)
    optimizer = make_optimizer({"optimizer": "adagrad", "lr": lr, "weight_decay": 0.0}, model.parameters())
    dense = torch.rand(batch, n_dense)
    embedded = torch.randn(batch, n_sparse, dim, requires_grad=True)
    label = (torch.rand(batch) < 0.25).float()

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(dense, embedded)
        update(optimizer, torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), label))
        embedded.grad = None

    seconds = _time(step, steps)
    flops = dlrm_flops_per_sample(n_dense, n_sparse, dim, bottom, top) * batch
    top_in = (n_sparse + 1) * n_sparse // 2 + dim
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return {"precision": precision, "ms_per_step": seconds * 1e3, "samples_per_sec": batch / seconds,
            "gflop_per_step": flops / 1e9, "achieved_gflops": flops / seconds / 1e9,
            "matmul_gflops_top_layer_shape": matmul_gflops(batch, top_in, top[0], dtype)}
