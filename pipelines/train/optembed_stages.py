"""`embtables train` with method optembed: supernet → evolutionary search → retrain, one run dir.

    RUN/supernet/          a complete run of the supernet (run.json, checkpoints, metrics.json) and
                           init.pt, its weights before training (the retrain rewinds to them)
    RUN/search/plan.npz    kept rows (bit mask) and searched dim per field; search.json its record
    RUN/                   the retrained compact model: run.json, checkpoints, metrics.json

`embedding.compression.stage` = all | supernet | search | retrain runs one stage or all; each
stage needs the previous one's artifacts and refuses to redo its own (with --resume, finished
stages are skipped and an interrupted one continues from its checkpoint). The search scores
candidates on a held-out slice of the TRAINING split (pipelines/data/holdout.py) that the supernet
never trains on; the reported validation split is only ever used for reporting.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch

from embtables.errors import EmbtablesError
from embtables.methods.build import build_methods
from embtables.methods.optembed import OptEmbed, OptEmbedCompact, OptEmbedOptions, compact_bytes, load_plan, save_plan
from embtables.metrics import roc_auc
from embtables.pipelines.train.checkpoint import (checkpoint_dirs, latest_checkpoint, model_state, save_torch,
                                                  write_json_atomic)
from embtables.pipelines.train.evolution import evolve
from embtables.pipelines.data.holdout import excluding_held_out, held_out, subset_batch
from embtables.pipelines.train.build import build_model, load_run, resolve_inputs
from embtables.pipelines.train.local import check_out_path, fit
from embtables.pipelines.train.run_identity import check_resume
from embtables.pipelines.train.run_lock import run_lock

STAGES = ("supernet", "search", "retrain")


def run_optembed(cfg: dict, out, resume: bool = False, progress: bool = True) -> dict:
    out = Path(out)
    check_out_path(out)
    opts = OptEmbedOptions.from_compression(cfg["embedding"]["compression"])
    inputs = resolve_inputs(cfg)  # bad config or data fails here, before anything is written
    if resume and ((out / "run.json").is_file() or (out / "supernet" / "run.json").is_file()):
        check_resume(out, cfg, inputs)
    build_methods(inputs.features, _stage_cfg(cfg, opts, "supernet")["embedding"])  # option errors, cheaply
    todo = STAGES if opts.stage == "all" else (opts.stage,)
    paths = {"supernet": out / "supernet" / "metrics.json", "search": out / "search" / "plan.npz",
             "retrain": out / "metrics.json"}
    if opts.stage in ("all", "supernet") and not resume and out.exists() and any(out.iterdir()):
        raise EmbtablesError(f"output dir {out} is not empty; pick a new --out or pass --resume")
    for stage in todo:
        before = STAGES[:STAGES.index(stage)]
        for need in before:
            if need not in todo and not paths[need].is_file() and not (need == "search" and opts.plan):
                raise EmbtablesError(f"optembed stage {stage!r} needs the {need} stage's {paths[need]}; "
                                     f"run stage {need} first")
        if paths[stage].is_file() and not resume:
            raise EmbtablesError(f"optembed stage {stage!r} already finished in {out} ({paths[stage]}); "
                                 f"pass --resume to skip it or pick a new --out")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with run_lock(out):
            for stage in todo:
                if paths[stage].is_file():
                    print(f"optembed: {stage} already done, skipping")
                    continue
                print(f"optembed: stage {stage}")
                if stage == "supernet":
                    _supernet(cfg, out, inputs, opts, resume, progress)
                elif stage == "search":
                    _search(cfg, out, inputs, opts)
                else:
                    _retrain(cfg, out, inputs, opts, resume, progress)
    except BaseException:
        if created and not checkpoint_dirs(out / "supernet"):
            shutil.rmtree(out, ignore_errors=True)  # nothing worth keeping
        raise
    if todo[-1] == "search":  # what `embtables train` prints, from the search's point of view
        record = _read(out / "search" / "search.json")
        return {**record, "auc": record["held_out_auc"], "logloss": float("nan"), "samples_per_sec": float("nan"),
                "compression_ratio": record["full_embedding_bytes"] / record["embedding_bytes"]}
    return json.loads(paths[todo[-1]].read_text())


def _stage_cfg(cfg: dict, opts: OptEmbedOptions, stage: str, **compression) -> dict:
    c = copy.deepcopy(cfg)
    c["embedding"]["compression"].update(stage=stage, **compression)
    if stage == "supernet" and opts.supernet_epochs:
        c["train"]["epochs"] = opts.supernet_epochs
    return c


def _supernet(cfg, out, inputs, opts, resume, progress) -> dict:
    sdir = out / "supernet"
    cfg_s = _stage_cfg(cfg, opts, "supernet")
    torch.manual_seed(cfg["train"]["seed"])
    model = build_model(cfg_s, inputs)
    resuming = resume and latest_checkpoint(sdir) is not None
    sdir.mkdir(parents=True, exist_ok=True)
    if not (sdir / "init.pt").is_file():  # the weights the retrain rewinds to
        tmp = sdir / f".init.pt.tmp-{os.getpid()}"
        save_torch(model_state(model), tmp)
        os.replace(tmp, sdir / "init.pt")
    metrics = fit(cfg_s, sdir, inputs, model, resume=resuming, progress=progress,
                  batch_filter=excluding_held_out(opts.holdout, cfg["train"]["seed"]))
    print(f"optembed supernet: valid AUC {metrics['auc']:.4f}; thresholds "
          + ", ".join(f"{m.feature_names[0]}={m.threshold.item():.3f}" for m in _supernets(model) if m.prunable))
    return metrics


def _supernets(model) -> list[OptEmbed]:
    return [m for m in model.embeddings.methods if isinstance(m, OptEmbed)]


@torch.no_grad()
def held_out_embeddings(model, inputs, fraction: float, seed: int, max_rows: int, batch_size: int):
    """(labels, dense inputs, embeddings [N, F, D] with masks, all dims) of the held-out rows."""
    from embtables.pipelines.data.batches import iterate_batches

    model.eval()
    labels, dense, emb, n = [], [], [], 0
    for batch in iterate_batches(inputs.dataset, "train", batch_size, shuffle=False):
        part = subset_batch(batch, held_out(batch, fraction, seed))
        if part.rows == 0:
            continue
        labels.append(part.label)
        dense.append(part.dense[:, inputs.dense_index])
        emb.append(model.embeddings(part.sparse))
        n += part.rows
        if n >= max_rows:
            break
    if not labels:
        raise EmbtablesError(f"{inputs.dataset}: the held-out share {fraction} of the training split is empty; "
                             "raise embedding.compression.holdout")
    return torch.cat(labels)[:max_rows], torch.cat(dense)[:max_rows], torch.cat(emb)[:max_rows]


@torch.no_grad()
def truncated_auc(network, labels, dense, emb, dim_mask: torch.Tensor, batch_size: int = 16384) -> float:
    """AUC of the network on embeddings whose dims are cut per field by dim_mask [F, D]."""
    network.eval()
    probs = [torch.sigmoid(network(dense[a:a + batch_size], emb[a:a + batch_size] * dim_mask))
             for a in range(0, len(labels), batch_size)]
    return roc_auc(labels.numpy(), torch.cat(probs).numpy())


def _search(cfg, out, inputs, opts) -> dict:
    model, cfg_s, _ = load_run(out / "supernet")
    # The held-out rows are the ones THIS supernet did not train on, whatever the current config says.
    holdout = OptEmbedOptions.from_compression(cfg_s["embedding"]["compression"]).holdout
    holdout_seed = cfg_s["train"]["seed"]
    seed = cfg["train"]["seed"] if opts.search_seed is None else opts.search_seed
    emb_layer, dim = model.embeddings, cfg["embedding"]["dim"]
    supernets = _supernets(model)
    weights = emb_layer.lookup.lookup_state()
    keep = [m.keep_mask(weights[f"{m.table_name}.weight"]) for m in supernets]
    rows = [m.features[0].rows for m in supernets]
    kept = [int(k.sum()) for k in keep]
    names = [f.name for f in inputs.features]
    positions = [names.index(m.feature_names[0]) for m in supernets]
    fixed = sum(m.embedding_bytes() for m in emb_layer.methods if not isinstance(m, OptEmbed))
    ratio = float(cfg["embedding"]["compression"].get("ratio", 1.0))
    budget = emb_layer.full_embedding_bytes() / ratio if ratio > 1 else float("inf")

    def cost(dims) -> float:
        return fixed + sum(compact_bytes(n, k, d) for n, k, d in zip(rows, kept, dims))

    labels, dense, emb = held_out_embeddings(model, inputs, holdout, holdout_seed, opts.search_rows,
                                             cfg["train"]["eval_batch_size"])
    print(f"optembed search: {len(labels):,} held-out rows, {len(supernets)} fields, kept rows "
          f"{sum(kept):,}/{sum(rows):,}, budget {budget:,.0f} bytes")

    def fitness(dims) -> float:
        mask = torch.ones(len(names), dim)
        for p, d in zip(positions, dims):
            mask[p, d:] = 0
        return truncated_auc(model.network, labels, dense, emb, mask)

    result = evolve(tuple([dim] * len(supernets)), fitness, seed=seed, cost=cost, budget=budget,
                    iterations=opts.iterations, population=opts.population, mutations=opts.mutations,
                    crossovers=opts.crossovers, keep=opts.keep, p_mutation=opts.p_mutation, log=print)
    if not result.feasible:
        print(f"optembed search: WARNING no candidate meets the budget ({budget:,.0f} bytes; the smallest "
              f"costs {result.cost:,.0f}): prune more rows (raise alpha) or lower the ratio")
    (out / "search").mkdir(exist_ok=True)
    record = {"held_out_rows": int(len(labels)), "held_out_auc": result.fitness,
              "held_out_auc_full_dims": fitness(tuple([dim] * len(supernets))),
              "budget_bytes": budget, "embedding_bytes": result.cost,
              "full_embedding_bytes": emb_layer.full_embedding_bytes(), "feasible": result.feasible,
              "evaluations": result.evaluations, "history": result.history, "seed": seed,
              "fields": {m.feature_names[0]: {"rows": n, "kept_rows": k, "dim": d,
                                              **({"threshold": m.threshold.item()} if m.prunable else {})}
                         for m, n, k, d in zip(supernets, rows, kept, result.best)}}
    write_json_atomic(out / "search" / "search.json", record)
    save_plan(out / "search" / "plan.npz", {m.feature_names[0]: (k, d)
                                             for m, k, d in zip(supernets, keep, result.best)})
    print(f"optembed search: held-out AUC {result.fitness:.4f} (all dims {record['held_out_auc_full_dims']:.4f}), "
          f"dims {list(result.best)}, {result.cost:,.0f} bytes")
    return record


def rewind(model, init_state: dict, plan: dict) -> None:
    """Set the compact model to the supernet's initial weights: dense as they were, each compact
    table = the supernet table's initial rows that were kept, first d_f dims."""
    current = model.state_dict()
    dense = {k: v for k, v in init_state["dense"].items() if k in current and current[k].shape == v.shape}
    missing = [k for k in current if k.startswith("network.") and k not in dense]
    if missing:
        raise EmbtablesError(f"supernet init does not fit the retrained network: {missing[:5]}")
    model.load_state_dict(dense, strict=False)
    tables = model.embeddings.lookup.lookup_state()
    for m in model.embeddings.methods:
        for t in m.physical_tables():
            w0 = init_state["tables"][f"{t.name}.weight"]
            if isinstance(m, OptEmbedCompact):
                if m.kept_rows == 0:
                    continue  # the placeholder row nothing maps to
                w0 = w0[torch.from_numpy(plan[m.feature_names[0]][0])][:, :m.table_dim]
            tables[f"{t.name}.weight"] = w0
            tables[f"{t.name}.momentum"] = torch.zeros_like(tables[f"{t.name}.momentum"])
    model.embeddings.lookup.load_lookup_state(tables)


def _retrain(cfg, out, inputs, opts, resume, progress) -> dict:
    plan_path = Path(opts.plan) if opts.plan else out / "search" / "plan.npz"
    cfg_r = _stage_cfg(cfg, opts, "retrain", plan=str(plan_path.resolve()))
    torch.manual_seed(cfg["train"]["seed"])
    model = build_model(cfg_r, inputs)
    resuming = resume and latest_checkpoint(out) is not None  # else start over from the rewind
    if not resuming:
        init = out / "supernet" / "init.pt"
        if not init.is_file():
            raise EmbtablesError(f"optembed retrain: {init} (the supernet's initial weights) is missing")
        rewind(model, torch.load(init, map_location="cpu", weights_only=False), load_plan(plan_path))
    metrics = fit(cfg_r, out, inputs, model, resume=resuming, progress=progress)
    metrics["optembed"] = summary(out, model, metrics)
    write_json_atomic(out / "metrics.json", metrics)
    return metrics


def summary(out: Path, model, metrics: dict) -> dict:
    """Stage AUCs, kept rows and dims per field, the achieved ratio — for metrics.json."""
    supernet = _read(out / "supernet" / "metrics.json")
    search = _read(out / "search" / "search.json")
    fields = {}
    for m in model.embeddings.methods:
        if isinstance(m, OptEmbedCompact):
            h = m.hyperparameters()
            found = search.get("fields", {}).get(m.feature_names[0], {})
            fields[m.feature_names[0]] = {"rows": h["rows"], "kept_rows": h["kept_rows"], "dim": h["dim"],
                                          "bytes": m.embedding_bytes(),
                                          **({"threshold": found["threshold"]} if "threshold" in found else {})}
    return {
        "stage_auc": {"supernet": supernet.get("auc"), "search_held_out": search.get("held_out_auc"),
                      "search_held_out_full_dims": search.get("held_out_auc_full_dims"),
                      "retrain": metrics["auc"]},
        "fields": fields,
        "kept_rows": sum(f["kept_rows"] for f in fields.values()),
        "rows": sum(f["rows"] for f in fields.values()),
        "achieved_ratio": metrics["compression_ratio"],
        "budget_met": bool(search.get("feasible", True)),
        "supernet_train_rows_seen": supernet.get("train_rows_seen"),
        "held_out_rows": search.get("held_out_rows"),
    }


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
