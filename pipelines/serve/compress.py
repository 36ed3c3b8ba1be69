"""`embtables compress`: post-hoc compression of a trained `full` run into a new run dir.

Every feature whose frequency-weighted PCA (low_rank.from_trained) is smaller than its full
table is replaced by it; the rest stay full. The new run is an ordinary run dir: its config
names each compressed feature as `low_rank` with its rank and mean row, so `embtables eval`
and `export` rebuild it like any trained run, and metrics.json sets the compressed model's
validation AUC/logloss next to the original's.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import yaml

from embtables.atomic import atomic_dir
from embtables.errors import EmbtablesError
from embtables.methods.build import split_small_features
from embtables.methods.low_rank import LowRank

METHODS = ("low_rank",)


def compress(run_dir, method: str = "low_rank", ratio: float | None = None, rank: int | None = None,
             out=None) -> Path:
    from embtables.pipelines.train.checkpoint import (latest_checkpoint, load_checkpoint, save_checkpoint,
                                                write_json_atomic)
    from embtables.pipelines.train.evaluate import evaluate
    from embtables.pipelines.train.build import build_model, load_run

    if method not in METHODS:
        raise EmbtablesError(f"compress: unknown method {method!r}; available: {', '.join(METHODS)}")
    if (ratio is None) == (rank is None):
        raise EmbtablesError("compress: give exactly one of ratio or rank")
    if ratio is not None and ratio <= 1:
        raise EmbtablesError(f"compress: ratio must be > 1, got {ratio}")
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir.with_name(f"{run_dir.name}-{method}")
    if out.exists() and any(out.iterdir()):
        raise EmbtablesError(f"output dir {out} is not empty; pick a new --out")

    model, cfg, inputs = load_run(run_dir)
    emb = model.embeddings
    others = sorted({m.name for m in emb.methods} - {"full"})
    if others:
        raise EmbtablesError(f"compress needs a run trained with full tables; {run_dir} uses {', '.join(others)}")
    dim = emb.dim
    weights = dict(zip((t.name for t in emb.tables), emb.lookup.table_weights()))
    trained = {m.features[0].name: weights[m.table_name] for m in emb.methods}

    chosen = choose_low_rank(inputs.features, trained, dim, ratio, rank)
    cfg2 = compressed_config(cfg, chosen)
    model2 = build_model(cfg2, inputs)
    load_compressed_weights(model, model2, trained, chosen)

    batch = cfg["train"]["eval_batch_size"]
    before = evaluate(model, inputs.dataset, "valid", inputs.dense_index, batch)
    after = evaluate(model2, inputs.dataset, "valid", inputs.dense_index, batch)
    metrics = compressed_metrics(run_dir, cfg2, model, model2, before, after, chosen, ratio, rank)

    # Built under a hidden name and renamed in: a failed or killed compress leaves no half-written run.
    with atomic_dir(out, what="an empty directory") as tmp:
        source = load_checkpoint(latest_checkpoint(run_dir))
        save_checkpoint(tmp, source.get("step", 0), model2, None, source.get("position", {}))
        write_json_atomic(tmp / "run.json", {"config": cfg2, "dataset": str(inputs.dataset),
                                             "features": [f.name for f in inputs.features],
                                             "compressed_from": str(run_dir.resolve())})
        (tmp / "config.yaml").write_text(yaml.safe_dump({k: v for k, v in cfg2.items() if not k.startswith("_")},
                                                        sort_keys=False))
        write_json_atomic(tmp / "metrics.json", metrics)
    return out


def choose_low_rank(features, trained: dict[str, torch.Tensor], dim: int, ratio, rank) -> dict[str, LowRank]:
    """feature → post-hoc LowRank, for every feature where it is smaller than the full table.

    With a ratio, the smallest features stay full within a share of the budget (as training
    does) and the large ones take the raised ratio that keeps the total at full/ratio."""
    targets = {f.name: None for f in features}
    if ratio is not None:
        _, large, large_ratio = split_small_features(features, dim, ratio)
        targets = {f.name: large_ratio for f in large}
    chosen = {}
    for f in features:
        if f.name not in targets:
            continue
        k = None if rank is None else min(rank, dim)
        method = LowRank.from_trained(f, trained[f.name], rank=k, ratio=targets[f.name] if k is None else None)
        if method.embedding_bytes() < f.full_bytes(dim):
            chosen[f.name] = method
    return chosen


def compressed_config(cfg: dict, chosen: dict[str, LowRank]) -> dict:
    """The run's config with each compressed feature overridden to its low_rank structure."""
    cfg2 = copy.deepcopy(cfg)
    features = cfg2["embedding"].setdefault("features", {})
    for name, m in chosen.items():
        features[name] = {"compression": {"method": "low_rank", "ratio": 1.0, "rank": m.rank, "mean": True}}
    return cfg2


def load_compressed_weights(model, model2, trained: dict[str, torch.Tensor], chosen: dict[str, LowRank]) -> None:
    """Network as trained; full tables copied; low-rank tables and bases from the PCA."""
    model2.network.load_state_dict(model.network.state_dict())
    rows: dict[str, torch.Tensor] = {}
    for m in model2.embeddings.methods:
        name = m.features[0].name
        if name in chosen:
            pca = chosen[name]
            if (m.name, m.rank, m.rows) != ("low_rank", pca.rank, pca.rows):
                raise EmbtablesError(f"compress: rebuilt feature {name!r} does not match its PCA structure")
            with torch.no_grad():
                m.basis.copy_(pca.basis)
            rows.update(pca.initial_tables())
        else:
            rows[m.table_name] = trained[name]
    lookup = model2.embeddings.lookup
    with torch.no_grad():
        for t, w in zip(lookup.tables, lookup.table_weights()):
            w.copy_(rows[t.name])
    model2.eval()


def compressed_metrics(run_dir: Path, cfg2, model, model2, before: dict, after: dict, chosen, ratio, rank) -> dict:
    original = {}
    if (run_dir / "metrics.json").is_file():
        original = json.loads((run_dir / "metrics.json").read_text())
    emb, emb2 = model.embeddings, model2.embeddings
    achieved = emb2.full_embedding_bytes() / emb2.embedding_bytes()
    return {
        "auc": after["auc"], "logloss": after["logloss"], "valid_rows": after["rows"],
        "original_auc": before["auc"], "original_logloss": before["logloss"],
        "auc_change": after["auc"] - before["auc"],
        "embedding_bytes": emb2.embedding_bytes(), "full_embedding_bytes": emb2.full_embedding_bytes(),
        "compression_ratio": achieved,
        # Post-hoc PCA cannot go below rank 1 (one float per id): ratios beyond ~d are out of reach.
        "budget_met": ratio is None or achieved >= ratio * (1 - 1e-9),
        "original_embedding_bytes": emb.embedding_bytes(),
        "method": "low_rank", "mode": "post_hoc", "requested_ratio": ratio, "requested_rank": rank,
        "compressed_from": str(run_dir.resolve()),
        "post_hoc": {name: {"rank": m.rank, **m.info} for name, m in chosen.items()},
        "kept_full": [f.name for f in emb2.features if f.name not in chosen],
        # Training figures are the source run's: compression does not train.
        "samples_per_sec": original.get("samples_per_sec"), "train_rows_seen": original.get("train_rows_seen"),
        "model": cfg2["model"]["name"], "embedding": emb2.describe(),
    }


def add_compress_parser(subparsers) -> None:
    p = subparsers.add_parser("compress", help="post-hoc compression of a trained full run (low-rank PCA)")
    p.add_argument("run", help="run dir of a model trained with full tables")
    p.add_argument("--method", default="low_rank", choices=METHODS)
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--ratio", type=float, help="target full/compressed embedding bytes")
    size.add_argument("--rank", type=int, help="rank for every feature it makes smaller")
    p.add_argument("--out", default=None, help="new run dir (default: RUN-METHOD next to RUN)")
    p.set_defaults(func=cmd_compress)


def cmd_compress(args) -> None:
    out = compress(args.run, method=args.method, ratio=args.ratio, rank=args.rank, out=args.out)
    m = json.loads((out / "metrics.json").read_text())
    print(f"AUC {m['auc']:.4f} (was {m['original_auc']:.4f})  logloss {m['logloss']:.4f} "
          f"(was {m['original_logloss']:.4f})  compression {m['compression_ratio']:.1f}x  "
          f"{len(m['post_hoc'])} features low-rank → {out}/metrics.json")
    if not m["budget_met"]:
        print(f"note: ratio {m['requested_ratio']} is out of reach for post-hoc low rank (rank ≥ 1 per feature); "
              f"reached {m['compression_ratio']:.1f}x")
