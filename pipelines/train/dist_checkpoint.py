"""Sharded checkpoints of a distributed run (torch.distributed.checkpoint), atomic and readable
by one process.

Layout of RUN/checkpoints/step-N/ (written as .tmp-step-N/ and published by pipelines.train.checkpoint
when every rank is done: digests.json, rename, rotation):
  .metadata, __R_0.distcp     DCP: "model" (table shards + dense params), "fused" (row-wise
                              Adagrad state of each table shard)
  dense_optimizer.pt          dense optimizer state (replicated under DDP: rank 0 writes it)
  position.json               epoch, step, rows seen, history (global)
  consumed-rank-R.npy         row hashes rank R trained on in the current epoch (exactly-once)
  plan.json                   the sharding plan (to turn shards back into whole tables)
  digests.json                sha256 of every file above, verified before any load
`load_full_state` reads it without any process group into the single-process checkpoint
format, so eval / export / load_run work on distributed runs unchanged.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from embtables.errors import EmbtablesError
from embtables.models import LOOKUP_PREFIX

EBC_PREFIX = "embeddings.lookup.ebc.embedding_bags."


def is_sharded_checkpoint(path: Path) -> bool:
    return (Path(path) / ".metadata").is_file()


def _tables_state(dmp) -> dict:
    return {"model": dmp.state_dict(), "fused": dmp.fused_optimizer.state_dict()}


def save_sharded(run_dir: Path, step: int, dmp, optimizer, position: dict, consumed: np.ndarray,
                 plan: dict) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    import torch.distributed.checkpoint as dcp

    from embtables.pipelines.train.checkpoint import TEMP_PREFIX, publish, save_torch

    rank = dist.get_rank()
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:08d}"
    tmp = root / f"{TEMP_PREFIX}{step:08d}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    try:
        dcp.save(_tables_state(dmp), checkpoint_id=str(tmp))
        np.save(tmp / f"consumed-rank-{rank}.npy", np.sort(consumed.astype(np.uint64)))
        dist.barrier()  # every rank's files are complete before the directory becomes visible
        if rank == 0:
            save_torch(optimizer.state_dict(), tmp / "dense_optimizer.pt")
            (tmp / "plan.json").write_text(json.dumps(plan))
            (tmp / "position.json").write_text(json.dumps({**position, "step": step}))
            publish(tmp, final)  # digests, rename, the one rotation
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # no partial checkpoint left filling the disk
        raise
    dist.barrier()
    return final


def load_sharded(path: Path, dmp, optimizer) -> tuple[dict, np.ndarray]:
    """Collective: restore tables, fused and dense optimizer state; (position, consumed hashes)."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    state = _tables_state(dmp)
    try:
        dcp.load(state, checkpoint_id=str(path))
    except Exception as e:
        raise EmbtablesError(f"cannot restore sharded checkpoint {path}: {e}") from None
    dmp.load_state_dict(state["model"])
    dmp.fused_optimizer.load_state_dict(state["fused"])
    optimizer.load_state_dict(torch.load(path / "dense_optimizer.pt", map_location="cpu", weights_only=False))
    return read_position(path)


def read_position(path: Path) -> tuple[dict, np.ndarray]:
    """Position and the union of all ranks' consumed row hashes (sorted), any world size."""
    path = Path(path)
    position = json.loads((path / "position.json").read_text())
    parts = [np.load(f) for f in sorted(path.glob("consumed-rank-*.npy"))]
    consumed = np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.uint64)
    return position, consumed


def load_full_state(path: Path) -> dict:
    """The checkpoint as whole tensors, in pipelines.checkpoint's format (no process group needed):
    {"dense": model state minus lookup, "tables": {T.weight, T.momentum}, "optimizer", "position"}."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)
    reader = dcp.FileSystemReader(str(path))
    meta = reader.read_metadata().state_dict_metadata
    full = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
            if isinstance(m, TensorStorageMetadata)}
    with warnings.catch_warnings():  # "no process group: loading in one process" is the intent
        warnings.simplefilter("ignore")
        dcp.load(full, storage_reader=reader, no_dist=True)
    plan = json.loads((path / "plan.json").read_text())
    dense, tables = {}, {}
    for key, value in full.items():
        if key.startswith("model.") and not key.startswith("model." + LOOKUP_PREFIX):
            dense[key[len("model."):]] = value
    for name, t in plan["tables"].items():
        weight = full[f"model.{EBC_PREFIX}{name}.weight"]
        tables[f"{name}.weight"] = weight[:, :t["dim"]].clone()
        momentum = full[f"fused.state.{EBC_PREFIX}{name}.weight.{name}.momentum1"]
        tables[f"{name}.momentum"] = whole_row_momentum(momentum, weight.shape[0], t)
    position, _ = read_position(path)
    optimizer = torch.load(path / "dense_optimizer.pt", map_location="cpu", weights_only=False)
    return {"dense": dense, "tables": tables, "optimizer": optimizer, "position": position}


def whole_row_momentum(momentum: torch.Tensor, rows: int, table: dict) -> torch.Tensor:
    """Row-wise Adagrad state of the whole (unpadded) row from the per-column-shard states.

    Each column shard k of width d_k keeps Σ mean_{its columns}(g²); the whole row's state is
    Σ_k d_k·s_k / dim (padding columns have zero gradient). Table-wise: one shard of the padded width.
    """
    widths = [s["sizes"][1] for s in sorted(table["shards"], key=lambda s: s["offsets"][1])]
    if momentum.numel() != rows * len(widths):
        widths = [table["padded_dim"]]  # one row-wise state per row (table- or row-wise shards)
        momentum = momentum.view(1, rows)
    per_shard = momentum.view(len(widths), rows)
    w = torch.tensor(widths, dtype=per_shard.dtype).unsqueeze(1)
    return (per_shard * w).sum(0) / table["dim"]
