"""`embtables train`: one process, shuffled Parquet batches → model → exact validation metrics."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from embtables.errors import EmbtablesError
from embtables.pipelines.checkpoint import (latest_checkpoint, load_checkpoint, load_model_state, model_state,
                                            save_checkpoint, write_json_atomic)
from embtables.pipelines.evaluate import evaluate
from embtables.pipelines.setup_run import build_model, resolve_inputs


def make_optimizer(cfg_train: dict, params):
    if cfg_train["optimizer"] == "adagrad":
        return torch.optim.Adagrad(params, lr=cfg_train["lr"], weight_decay=cfg_train["weight_decay"])
    return torch.optim.Adam(params, lr=cfg_train["lr"], weight_decay=cfg_train["weight_decay"])


def prepare_out_dir(out: Path, resume: bool) -> bool:
    """Create `out` (returns True if this call created it); refuse to overwrite a finished run."""
    if resume:
        if not (out / "run.json").is_file():
            raise EmbtablesError(f"--resume: {out} holds no run to resume (no run.json)")
        return False
    if out.exists() and any(out.iterdir()):
        raise EmbtablesError(f"output dir {out} is not empty; pick a new --out or pass --resume")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    return created


def train(cfg: dict, out: str | Path, resume: bool = False, progress: bool = True) -> dict:
    out = Path(out)
    tcfg = cfg["train"]
    torch.set_num_threads(tcfg["threads"] or os.cpu_count() or 1)
    # Everything that can fail on bad config or data runs before the output dir exists.
    inputs = resolve_inputs(cfg)
    torch.manual_seed(tcfg["seed"])
    model = build_model(cfg, inputs)
    optimizer = make_optimizer(tcfg, model.dense_parameters())
    created = prepare_out_dir(out, resume)
    try:
        return _train(cfg, out, inputs, model, optimizer, resume, progress)
    except BaseException:
        if created and latest_checkpoint(out) is None:
            shutil.rmtree(out, ignore_errors=True)  # nothing worth keeping: leave no half-written run
        raise


def _train(cfg, out, inputs, model, optimizer, resume, progress) -> dict:
    from embtables.pipelines.batches import iterate_batches

    tcfg = cfg["train"]
    position = {"epoch": 0, "rows_in_epoch": 0, "step": 0, "train_rows_seen": 0, "train_seconds": 0.0,
                "history": []}
    if resume and (ckpt := latest_checkpoint(out)) is not None:
        state = load_checkpoint(ckpt)
        load_model_state(model, state)
        optimizer.load_state_dict(state["optimizer"])
        position = state["position"]
        print(f"resuming from {ckpt.name}: epoch {position['epoch']}, row {position['rows_in_epoch']}")
    write_json_atomic(out / "run.json", {"config": cfg, "dataset": str(inputs.dataset),
                                         "features": [f.name for f in inputs.features]})
    (out / "config.yaml").write_text(yaml.safe_dump({k: v for k, v in cfg.items() if not k.startswith("_")},
                                                    sort_keys=False))
    emb = model.embeddings
    print(f"embedding: {emb.embedding_bytes():,} bytes (full {emb.full_embedding_bytes():,}, "
          f"{emb.full_embedding_bytes() / emb.embedding_bytes():.1f}x) in {len(emb.tables)} tables, "
          f"backends {sorted(set(emb.lookup.backends))}")
    loss_fn = torch.nn.BCEWithLogitsLoss()
    train_rows = inputs.stats["splits"]["train"]["rows"]
    every = tcfg["checkpoint_every_steps"]
    max_steps = tcfg["max_steps"]
    model.train()
    while position["epoch"] < tcfg["epochs"] and not _done(position, max_steps):
        epoch = position["epoch"]
        bar = tqdm(total=train_rows, initial=position["rows_in_epoch"], unit="rows", disable=not progress,
                   desc=f"epoch {epoch + 1}/{tcfg['epochs']}", mininterval=1.0)
        batches = iterate_batches(inputs.dataset, "train", tcfg["batch_size"], shuffle=True, seed=tcfg["seed"],
                                  epoch=epoch, start_row=position["rows_in_epoch"])
        tick = time.perf_counter()
        for batch in batches:
            logits = model(batch.dense[:, inputs.dense_index], batch.sparse)
            loss = loss_fn(logits, batch.label)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # table rows are updated inside this call (fused row-wise Adagrad)
            optimizer.step()
            position["step"] += 1
            position["rows_in_epoch"] += batch.rows
            position["train_rows_seen"] += batch.rows
            bar.update(batch.rows)
            if position["step"] % tcfg["log_every"] == 0:
                elapsed = position["train_seconds"] + time.perf_counter() - tick
                bar.set_postfix(loss=f"{loss.item():.4f}", rows_s=f"{position['train_rows_seen'] / elapsed:,.0f}")
            if every and position["step"] % every == 0:
                position["train_seconds"] += time.perf_counter() - tick
                tick = time.perf_counter()
                save_checkpoint(out, position["step"], model, optimizer, position)
            if _done(position, max_steps):
                break
        position["train_seconds"] += time.perf_counter() - tick
        bar.close()
        if not _done(position, max_steps) or position["rows_in_epoch"] >= train_rows:
            position["epoch"] += 1
            position["rows_in_epoch"] = 0
        scores = evaluate(model, inputs.dataset, "valid", inputs.dense_index, tcfg["eval_batch_size"])
        position["history"].append({"epoch": epoch + 1, "step": position["step"], **scores})
        print(f"epoch {epoch + 1}: valid AUC {scores['auc']:.4f}  logloss {scores['logloss']:.4f}")
        save_checkpoint(out, position["step"], model, optimizer, position)
    metrics = run_metrics(cfg, inputs, model, position)
    write_json_atomic(out / "metrics.json", metrics)
    return metrics


def _done(position, max_steps) -> bool:
    return max_steps is not None and position["step"] >= max_steps


def run_metrics(cfg, inputs, model, position) -> dict:
    emb = model.embeddings
    last = position["history"][-1] if position["history"] else {"auc": float("nan"), "logloss": float("nan"), "rows": 0}
    methods = sorted({m.name for m in emb.methods})
    metrics = {
        "auc": last["auc"], "logloss": last["logloss"], "valid_rows": last["rows"],
        "embedding_bytes": emb.embedding_bytes(), "full_embedding_bytes": emb.full_embedding_bytes(),
        "compression_ratio": emb.full_embedding_bytes() / emb.embedding_bytes(),
        "samples_per_sec": position["train_rows_seen"] / max(position["train_seconds"], 1e-9),
        "train_rows_seen": position["train_rows_seen"], "train_seconds": position["train_seconds"],
        "steps": position["step"], "epochs": position["history"],
        "method": cfg["embedding"]["compression"]["method"], "methods_used": methods,
        "requested_ratio": cfg["embedding"]["compression"].get("ratio", 1.0),
        "model": cfg["model"]["name"], "backends": sorted(set(emb.lookup.backends)),
        "embedding": emb.describe(), "dataset": str(inputs.dataset),
        "train_rows": inputs.stats["splits"]["train"]["rows"],
    }
    if "planted" in inputs.stats:
        metrics["planted"] = inputs.stats["planted"]
    return metrics
