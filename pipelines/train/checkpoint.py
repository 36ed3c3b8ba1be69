"""Checkpoints of a training run: atomic, complete or absent, and enough to rebuild the model.

Layout:  RUN/run.json                      dataset, resolved config, feature names
         RUN/checkpoints/step-00000042/    state.pt (tables by name, dense state, optimizer, position)
A checkpoint directory is written under a temporary name and renamed into place, so a crash
mid-write never replaces the last good one.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from embtables.errors import EmbtablesError

LOOKUP_PREFIX = "embeddings.lookup."


def model_state(model) -> dict:
    """Backend-independent state: tables and their optimizer state by table name, the rest as is."""
    dense = {k: v for k, v in model.state_dict().items() if not k.startswith(LOOKUP_PREFIX)}
    return {"dense": dense, "tables": model.embeddings.lookup.lookup_state()}


def load_model_state(model, state: dict) -> None:
    missing, unexpected = model.load_state_dict(state["dense"], strict=False)
    missing = [k for k in missing if not k.startswith(LOOKUP_PREFIX)]
    if missing or unexpected:
        raise EmbtablesError(f"checkpoint does not fit the model: missing {missing}, unexpected {unexpected}")
    model.embeddings.lookup.load_lookup_state(state["tables"])


def save_checkpoint(run_dir: Path, step: int, model, optimizer, position: dict, keep: int = 2) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    state = {**model_state(model), "optimizer": optimizer.state_dict() if optimizer else None,
             "position": position, "step": step}
    torch.save(state, tmp / "state.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = sorted((Path(run_dir) / "checkpoints").glob("step-*"))
    return done[-1] if done else None


def load_checkpoint(path: Path) -> dict:
    from embtables.pipelines.train.dist_checkpoint import is_sharded_checkpoint, load_full_state

    if is_sharded_checkpoint(path):  # written by a distributed run: gathered into whole tables
        return load_full_state(path)
    try:
        return torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=False)
    except Exception as e:
        raise EmbtablesError(f"cannot read checkpoint {path}: {e}") from None


def write_json_atomic(path: Path, data) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)
