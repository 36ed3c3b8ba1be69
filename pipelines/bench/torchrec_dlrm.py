"""TorchRec's own DLRM, the baseline of `embtables bench throughput`.

`torchrec.models.dlrm.DLRM` under DistributedModelParallel (gloo, one CPU rank): TorchRec's
planner places the tables and picks their kernels, the tables get fused row-wise Adagrad
(apply_optimizer_in_backward), the dense part plain Adagrad — TorchRec's recommended set-up.
"""
from __future__ import annotations

import socket
from contextlib import contextmanager
from pathlib import Path

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def process_group():
    """A one-rank gloo group for DMP (reuses an existing one)."""
    import torch.distributed as dist

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        if started:
            dist.destroy_process_group()


def build_torchrec_dlrm(stats: dict, dim: int, bottom: list[int], top: list[int], table_lr: float,
                        dense_lr: float, seed: int):
    """(DMP-wrapped DLRMTrain, optimizer); call inside `process_group()`."""
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.distributed import DistributedModelParallel
    from torchrec.models.dlrm import DLRM, DLRMTrain
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

    torch.manual_seed(seed)
    tables = [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=dim, feature_names=[f],
                                 num_embeddings=stats["features"][f]["rows"]) for f in stats["sparse"]]
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    model = DLRMTrain(DLRM(embedding_bag_collection=ebc, dense_in_features=len(stats["dense"]),
                           dense_arch_layer_sizes=[*bottom, dim], over_arch_layer_sizes=[*top, 1],
                           dense_device=torch.device("cpu")))
    apply_optimizer_in_backward(RowWiseAdagrad, model.model.sparse_arch.parameters(), {"lr": table_lr, "eps": 1e-8})
    dmp = DistributedModelParallel(module=model, device=torch.device("cpu"))
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                  lambda params: torch.optim.Adagrad(params, lr=dense_lr))
    dmp.train()
    return dmp, CombinedOptimizer([dmp.fused_optimizer, dense])


def compute_kernels(dmp) -> list[str]:
    return sorted({str(s.compute_kernel) for p in dmp.plan.plan.values() for s in p.values()})


def torchrec_batches(dataset: Path, batch_size: int, count: int, seed: int) -> list:
    """`count` training batches, decoded up front (TorchRec is timed without loading cost)."""
    from torchrec.datasets.utils import Batch as TorchrecBatch

    from embtables.pipelines.data.batches import iterate_batches

    out = []
    while len(out) < count:
        for b in iterate_batches(dataset, "train", batch_size, shuffle=True, seed=seed, epoch=len(out),
                                 drop_last=True):
            out.append(TorchrecBatch(dense_features=b.dense, sparse_features=b.sparse, labels=b.label))
            if len(out) == count:
                break
    return out


def torchrec_step(dmp, optimizer, batch, bf16: bool = False) -> torch.Tensor:
    """One step; `bf16`: the forward under CPU bf16 autocast (TorchRec's example trains fp32)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss, _ = dmp(batch)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()
