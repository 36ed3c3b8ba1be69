"""Checkpoints of a training run: atomic, checksummed, complete or absent, enough to rebuild the model.

Layout:  RUN/run.json                      dataset, resolved config, feature names
         RUN/checkpoints/step-00000042/    state.pt (tables by name, dense state, optimizer, position,
                                           RNG), digests.json (sha256 of every other file)
A checkpoint directory is written under a temporary name, its digests last, and renamed into
place, so a crash mid-write never replaces the last good one. Readers verify the digests: a
corrupt (bit-flipped, truncated) checkpoint is refused, and the newest intact one is used instead,
with a warning naming both. Single-process and sharded (dist_checkpoint) checkpoints share the
publish / rotate / verify code here.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch

from embtables import atomic
from embtables.checksums import file_sha256
from embtables.errors import EmbtablesError
from embtables.models import LOOKUP_PREFIX

DIGESTS = "digests.json"
KEEP = 2  # checkpoints kept per run: the newest and one to fall back to
# A checkpoint being written: .tmp-step-N-PID, or .tmp-step-N for a sharded one (all ranks write it).
TEMP_PREFIX = ".tmp-step-"


class CorruptCheckpoint(EmbtablesError):
    pass


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


def rng_state() -> dict:
    """The generators a step draws from (dropout, OptEmbed's sampled dims), so a resume continues them."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict | None) -> None:
    if not state:
        return
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, model, optimizer, position: dict) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{TEMP_PREFIX}{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    state = {**model_state(model), "optimizer": optimizer.state_dict() if optimizer else None,
             "position": position, "step": step, "rng": rng_state()}
    try:
        tmp.mkdir()
        save_torch(state, tmp / "state.pt")
        return publish(tmp, root / f"step-{step:08d}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk must not stay full of our partial write
        raise


def save_torch(obj, path: Path) -> None:
    """torch.save through a Python file, so a full disk is an OSError naming the path (not a RuntimeError)."""
    try:
        with open(path, "wb") as f:
            torch.save(obj, f)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None


def publish(tmp: Path, final: Path) -> Path:
    """Digest every file of the finished temporary dir, rename it into place, drop old checkpoints."""
    digests = {f.name: file_sha256(f) for f in sorted(tmp.iterdir()) if f.is_file()}
    with open(tmp / DIGESTS, "w") as f:
        json.dump(digests, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoint_dirs(final.parent.parent)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def verify_checkpoint(path: Path) -> None:
    """Raise CorruptCheckpoint unless every file listed in digests.json is there with its digest."""
    path = Path(path)
    try:
        digests = json.loads((path / DIGESTS).read_text())
    except (OSError, ValueError) as e:
        raise CorruptCheckpoint(f"checkpoint {path} has no readable {DIGESTS} ({e})") from None
    for name, digest in digests.items():
        f = path / name
        if not f.is_file():
            raise CorruptCheckpoint(f"checkpoint {path} is missing {name}")
        if file_sha256(f) != digest:
            raise CorruptCheckpoint(f"checkpoint {path} is corrupt: {name} does not match its sha256")


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Finished checkpoint dirs, oldest first (intact or not)."""
    return sorted((Path(run_dir) / "checkpoints").glob("step-*"))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest intact checkpoint; a corrupt newer one is skipped with a warning naming both."""
    found = checkpoint_dirs(run_dir)
    bad = []
    for ckpt in reversed(found):
        try:
            verify_checkpoint(ckpt)
        except CorruptCheckpoint as e:
            bad.append(str(e))
            continue
        for reason in bad:
            print(f"warning: {reason}; falling back to {ckpt}", file=sys.stderr, flush=True)
        return ckpt
    if bad:
        raise CorruptCheckpoint(f"no intact checkpoint in {run_dir}: " + "; ".join(bad))
    return None


def load_checkpoint(path: Path) -> dict:
    from embtables.pipelines.train.dist_checkpoint import is_sharded_checkpoint, load_full_state

    verify_checkpoint(path)
    if is_sharded_checkpoint(path):  # written by a distributed run: gathered into whole tables
        return load_full_state(path)
    try:
        return torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=False)
    except Exception as e:
        raise EmbtablesError(f"cannot read checkpoint {path}: {e}") from None


def write_json_atomic(path: Path, data) -> None:
    """A run's JSON files (run.json, metrics.json, …): sorted keys, numpy values as numbers."""
    atomic.write_json_atomic(path, data, indent=2, sort_keys=True, default=_json_default)


def _json_default(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)
