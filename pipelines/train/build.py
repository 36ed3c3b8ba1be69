"""From a config to a ready model: resolve the dataset, its features, the methods and the network."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from embtables.collection import PooledEmbeddingCollection, build_embeddings, lookup_layout
from embtables.config import sparse_names
from embtables.errors import ConfigError, EmbtablesError
from embtables.kernels import RowwiseAdagrad
from embtables.methods.build import build_methods
from embtables.models import CTRModel, build_network
from embtables.specs import FeatureSpec


@dataclass
class RunInputs:
    dataset: Path              # encoded dataset directory
    stats: dict
    features: list[FeatureSpec]
    dense: list[str]           # dense columns used, in stats order
    dense_index: list[int]     # their positions in Batch.dense


def resolve_inputs(cfg: dict) -> RunInputs:
    from embtables.pipelines.data.prepared import ensure_encoded
    from embtables.pipelines.data.encode import feature_specs, load_stats

    data = cfg["data"]
    base = Path(cfg.get("_config_dir", "."))

    def resolve(p):
        if p is None:
            return None
        items = p if isinstance(p, list) else [p]
        out = [str(x) if Path(x).is_absolute() or Path(x).exists() else str(base / x) for x in map(str, items)]
        return out if isinstance(p, list) else out[0]

    dataset = Path(ensure_encoded(resolve(data["train"]), resolve(data["valid"]), label=data["label"],
                                  dense=data["dense"], sparse=sparse_names(cfg), min_count=data["min_count"]))
    stats = load_stats(dataset)
    all_features = {f.name: f for f in feature_specs(dataset)}
    wanted = sparse_names(cfg) or list(all_features)
    for name in wanted:
        if name not in all_features:
            raise ConfigError(f"data.sparse: feature {name!r} is not in {dataset}/stats.json "
                              f"(it has {', '.join(all_features)})")
    dense = data["dense"] if data["dense"] is not None else list(stats["dense"])
    for name in dense:
        if name not in stats["dense"]:
            raise ConfigError(f"data.dense: column {name!r} is not in {dataset}/stats.json "
                              f"(it has {', '.join(stats['dense']) or 'no dense columns'})")
    for name in cfg["embedding"]["features"]:
        if name not in wanted:
            raise ConfigError(f"embedding.features.{name}: no such sparse feature (features: {', '.join(wanted)})")
    return RunInputs(dataset, stats, [all_features[n] for n in wanted], dense,
                     [stats["dense"].index(n) for n in dense])


def build_model(cfg: dict, inputs: RunInputs, device: str = "cpu", backend: str | None = None,
                sharded_lookup=None) -> CTRModel:
    """The model on `device`; its tables behind `embedding.backend` (or `backend`), or behind
    `sharded_lookup(tables, keys)` (a TorchRec-sharded lookup, see train/sharding.py)."""
    emb = cfg["embedding"]
    methods = build_methods(inputs.features, emb)
    if sharded_lookup is not None:
        tables, keys, _ = lookup_layout(methods)
        collection = PooledEmbeddingCollection(inputs.features, emb["dim"], methods, sharded_lookup(tables, keys))
    else:
        collection = build_embeddings(inputs.features, emb["dim"], methods, backend=backend or emb["backend"],
                                      device=device, optimizer=RowwiseAdagrad(lr=emb["lr"], eps=emb["eps"]),
                                      seed=cfg["train"]["seed"])
    network = build_network(cfg["model"], len(inputs.dense), len(inputs.features), emb["dim"])
    return CTRModel(collection, network.to(device))


def load_run(run_dir: Path, backend: str | None = None, checkpoint: Path | None = None):
    """The trained model of a run dir (its latest checkpoint), with its config and inputs."""
    from embtables.pipelines.train.checkpoint import latest_checkpoint, load_checkpoint, load_model_state

    run_dir = Path(run_dir)
    info_path = run_dir / "run.json"
    if not info_path.is_file():
        raise EmbtablesError(f"{run_dir} is not a training run (no run.json)")
    info = json.loads(info_path.read_text())
    cfg = info["config"]
    ckpt = checkpoint or latest_checkpoint(run_dir)
    if ckpt is None:
        raise EmbtablesError(f"{run_dir} has no checkpoint")
    inputs = resolve_inputs(cfg)
    model = build_model(cfg, inputs, backend=backend)
    load_model_state(model, load_checkpoint(ckpt))
    return model.eval(), cfg, inputs

