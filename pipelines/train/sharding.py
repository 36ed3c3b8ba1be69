"""Sharded tables: the physical tables as one TorchRec EmbeddingBagCollection (the library's
TorchRecLookup, odd dims padded to 4), planned by the TorchRec planner and placed by
DistributedModelParallel; the plan goes to DIR/plan.json.
"""
from __future__ import annotations

import torch

from embtables.errors import ConfigError
from embtables.kernels import RowwiseAdagrad
from embtables.kernels.torchrec_lookup import TorchRecLookup, padded_dim
from embtables.specs import TableSpec

CPU_SHARDING = ("table_wise", "column_wise")
GPU_SHARDING = ("table_wise", "row_wise", "column_wise", "table_row_wise")
FP32 = 4


def sharded_lookup(tables: list[TableSpec], keys: list[tuple[str, str]], lr: float, eps: float) -> TorchRecLookup:
    """The lookup DMP shards: built on the meta device, so DistributedModelParallel allocates only
    this rank's shards (its state is those shards, written by dist_checkpoint); row-wise Adagrad
    is fused into each table's backward."""
    return TorchRecLookup(tables, keys, RowwiseAdagrad(lr=lr, eps=eps), device="meta")


def allowed_sharding(sharding: str | None, device: torch.device) -> list[str]:
    options = GPU_SHARDING if device.type == "cuda" else CPU_SHARDING
    if sharding is None:
        return ["table_wise", "column_wise"] if device.type != "cuda" else list(options)
    if sharding not in options:
        raise ConfigError(f"train.sharding {sharding!r} is not available on {device.type}; "
                          f"choose one of {', '.join(options)}"
                          + (" (row-wise sharding needs CUDA/NCCL)" if sharding in GPU_SHARDING else ""))
    return [sharding]


def plan_sharding(model, world: int, sharding: str | None, device: torch.device, batch_size: int):
    """The TorchRec plan for the model's EBC across `world` ranks (computed collectively)."""
    import torch.distributed as dist
    from torchrec.distributed.embedding_types import EmbeddingComputeKernel
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology

    types = allowed_sharding(sharding, device)
    # Column-wise shards of 4 columns at least (TBE's unit), so dim-16 tables can split at all.
    min_partition = 4 if types == ["column_wise"] else None
    constraints = {
        t.name: ParameterConstraints(sharding_types=types, compute_kernels=[EmbeddingComputeKernel.FUSED.value],
                                     **({"min_partition": min_partition} if min_partition else {}))
        for t in model.embeddings.tables}
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=world, compute_device=device.type),
                                       batch_size=batch_size, constraints=constraints, debug=False)
    sharders = [EmbeddingBagCollectionSharder()]
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    return plan, sharders


def shard_model(model, plan, sharders, device: torch.device):
    """DistributedModelParallel: the EBC sharded per plan, everything else under DDP."""
    import torch.distributed as dist
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.types import ShardingEnv

    return DistributedModelParallel(model, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
                                    plan=plan, sharders=sharders, device=device)


def plan_summary(plan, collection, world: int) -> dict:
    """Which shard of which table lives on which rank, and the bytes (weights + momentum) per rank."""
    dims = {t.name: t.dim for t in collection.tables}
    tables, per_rank = {}, [0] * world
    for module_plan in plan.plan.values():
        for name, ps in module_plan.items():
            shards = []
            for s in ps.sharding_spec.shards:
                rank = s.placement.rank()
                rows, cols = s.shard_sizes
                nbytes = (rows * cols + rows) * FP32  # weights + one row-wise Adagrad state per row
                per_rank[rank] += nbytes
                shards.append({"rank": rank, "offsets": list(s.shard_offsets), "sizes": [rows, cols],
                               "bytes": nbytes})
            tables[name] = {"sharding": ps.sharding_type, "kernel": ps.compute_kernel, "dim": dims[name],
                            "padded_dim": padded_dim(dims[name]), "ranks": sorted({s["rank"] for s in shards}),
                            "shards": shards}
    return {"world_size": world, "tables": tables, "bytes_per_rank": per_rank,
            "tables_per_rank": [sorted(n for n, t in tables.items() if r in t["ranks"]) for r in range(world)]}


def format_plan(summary: dict) -> str:
    lines = [f"sharding plan over {summary['world_size']} ranks:"]
    for name, t in summary["tables"].items():
        where = ", ".join(f"rank {s['rank']} cols {s['offsets'][1]}:{s['offsets'][1] + s['sizes'][1]}"
                          for s in t["shards"])
        lines.append(f"  {name:<28} {t['sharding']:<12} {where}")
    for r, b in enumerate(summary["bytes_per_rank"]):
        lines.append(f"  rank {r}: {b:,} bytes in {len(summary['tables_per_rank'][r])} tables")
    return "\n".join(lines)


def sharded_tables(model):
    """{table name: ShardedTensor of its weights} of the sharded EBC inside `model` (a DMP or module)."""
    inner = getattr(model, "module", model)
    ebc = inner.embeddings.lookup.ebc
    return {k.removeprefix("embedding_bags.").removesuffix(".weight"): v for k, v in ebc.state_dict().items()}


@torch.no_grad()
def load_full_tables(model, full_weight) -> None:
    """Copy each local shard from `full_weight(name) -> [rows, dim]` (padding columns stay zero)."""
    for name, st in sharded_tables(model).items():
        shards = st.local_shards()
        if not shards:
            continue
        full = full_weight(name)
        for shard in shards:
            (r0, c0), (rows, cols) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            block = torch.zeros(rows, cols)
            real = max(0, min(cols, full.shape[1] - c0))
            block[:, :real] = full[r0:r0 + rows, c0:c0 + real]
            shard.tensor.copy_(block)
