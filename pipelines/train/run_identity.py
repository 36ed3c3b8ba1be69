"""What a run is: the config keys that fix its data order and its model, and its dataset.

`--resume` continues a run only when these are unchanged, since a different seed, batch size,
method, dim, model or dataset would silently mix two trainings (rows seen twice or never, or a
checkpoint that does not fit). Keys that only say how long, how often or how fast may change.
"""
from __future__ import annotations

import json
from pathlib import Path

from embtables.errors import ConfigError, EmbtablesError
from embtables.pipelines.data.identity import dataset_fingerprint  # content of stats + every file

# Keys a resume may change: length, checkpointing, failure handling, evaluation, speed, where the
# dataset lies (its fingerprint is compared instead), and OptEmbed's stage selection.
SAFE_KEYS = frozenset({
    "train.epochs", "train.max_steps", "train.checkpoint_every_steps", "train.max_failures",
    "train.eval_batch_size", "train.log_every", "train.threads", "train.prefetch", "train.precision", "train.device",
    "embedding.backend", "data.train", "data.valid",
    "embedding.compression.stage", "embedding.compression.plan", "embedding.compression.supernet_epochs",
})


def run_record(cfg: dict, inputs) -> dict:
    """What RUN/run.json holds."""
    return {"config": cfg, "dataset": str(Path(inputs.dataset).resolve()),
            "dataset_fingerprint": dataset_fingerprint(inputs.dataset),
            "features": [f.name for f in inputs.features]}


def defining_keys(cfg: dict, prefix: str = "") -> dict:
    """{dotted key: value} of every config leaf that is not safe to change on resume."""
    out = {}
    for key, value in cfg.items():
        dotted = f"{prefix}{key}"
        if str(key).startswith("_") or dotted in SAFE_KEYS:
            continue
        if isinstance(value, dict):
            out.update(defining_keys(value, dotted + "."))
        else:
            out[dotted] = json.loads(json.dumps(value, default=str))  # as run.json stores it
    return out


def check_resume(run_dir: Path, cfg: dict, inputs) -> None:
    """Refuse to resume `run_dir` with a config or dataset other than the one it was started with."""
    run_dir = Path(run_dir)
    recorded = next((p for p in (run_dir / "run.json", run_dir / "supernet" / "run.json") if p.is_file()), None)
    if recorded is None:
        raise EmbtablesError(f"--resume: {run_dir} holds no run to resume (no run.json)")
    try:
        record = json.loads(recorded.read_text())
        old_cfg = record["config"]
    except (ValueError, KeyError) as e:
        raise EmbtablesError(f"--resume: {recorded} is unreadable ({e})") from None
    old, new = defining_keys(old_cfg), defining_keys(cfg)
    changed = [f"{k} {old.get(k, '(unset)')!r} → {new.get(k, '(unset)')!r}"
               for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    fingerprint = dataset_fingerprint(inputs.dataset)
    if record.get("dataset_fingerprint", fingerprint) != fingerprint:
        changed.append(f"dataset {record.get('dataset')} (fingerprint {record['dataset_fingerprint'][:12]}) → "
                       f"{Path(inputs.dataset).resolve()} (fingerprint {fingerprint[:12]})")
    if changed:
        raise ConfigError(f"--resume: {run_dir} was started with another config or dataset: " + "; ".join(changed)
                          + ". These fix the data order and the model; a resume may change only "
                          + ", ".join(sorted(k for k in SAFE_KEYS if k.startswith("train."))))
