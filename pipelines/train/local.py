"""`embtables train`: one process, shuffled Parquet batches → model → exact validation metrics."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from embtables.device import resolve_device
from embtables.errors import ConfigError, EmbtablesError
from embtables.pipelines.train.checkpoint import (checkpoint_dirs, latest_checkpoint, load_checkpoint,
                                                  load_model_state, restore_rng, save_checkpoint,
                                                  write_json_atomic)
from embtables.pipelines.train.evaluate import evaluate
from embtables.pipelines.train.loss_guard import LossGuard
from embtables.pipelines.train.precision import autocast_network, precision_record
from embtables.pipelines.data.prefetch import prefetch_plan, prefetched
from embtables.pipelines.train.placement import host_ready, to_device
from embtables.pipelines.train.build import build_model, resolve_inputs
from embtables.pipelines.train.run_identity import check_resume, run_record
from embtables.pipelines.train.run_lock import run_lock
from embtables.pipelines.data.identity import check_fingerprint, dataset_fingerprint, reading_dataset


def make_optimizer(cfg_train: dict, params):
    # fused: one kernel over all params per step (CPU and CUDA), not a Python loop per tensor
    if cfg_train["optimizer"] == "adagrad":
        return torch.optim.Adagrad(params, lr=cfg_train["lr"], weight_decay=cfg_train["weight_decay"], fused=True)
    return torch.optim.Adam(params, lr=cfg_train["lr"], weight_decay=cfg_train["weight_decay"], fused=True)


class Optimizers:
    """The dense optimizer plus the methods' own (e.g. SGD on OptEmbed's thresholds), as one."""

    def __init__(self, optimizers: list):
        self.optimizers = optimizers

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        for o, s in zip(self.optimizers, state["optimizers"], strict=True):
            o.load_state_dict(s)


def make_model_optimizer(cfg_train: dict, model):
    """Adam/Adagrad on the dense parameters; each method param group (Method.param_groups) on its own."""
    groups = model.embeddings.param_groups()
    if not groups:
        return make_optimizer(cfg_train, model.dense_parameters())
    own = {id(p) for g in groups for p in g["params"]}
    optimizers = [make_optimizer(cfg_train, [p for p in model.dense_parameters() if id(p) not in own])]
    for g in groups:
        if g.get("optimizer", "sgd") != "sgd":
            raise EmbtablesError(f"method param group optimizer {g['optimizer']!r} is not supported (sgd)")
        optimizers.append(torch.optim.SGD(g["params"], lr=g["lr"]))
    return Optimizers(optimizers)


def check_out_path(out: Path) -> None:
    """`out` must be a directory or a path one can create (no file in the way)."""
    if out.exists() and not out.is_dir():
        raise EmbtablesError(f"--out {out} is a file, not a directory")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise EmbtablesError(f"--out {out}: {parent} is a file, not a directory")
            break


def check_out_dir(out: Path, resume: bool) -> None:
    """Before any work: `out` must be a directory to create, an empty one, or (resume) a run."""
    check_out_path(out)
    if resume:
        if not (out / "run.json").is_file() and not (out / "supernet" / "run.json").is_file():
            raise EmbtablesError(f"--resume: {out} holds no run to resume (no run.json)")
    elif out.exists() and any(out.iterdir()):
        raise EmbtablesError(f"output dir {out} is not empty; pick a new --out or pass --resume")


def prepare_out_dir(out: Path, resume: bool) -> bool:
    """Create `out` (returns True if this call created it); refuse to overwrite a finished run."""
    check_out_dir(out, resume)
    if resume:
        return False
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    return created


def train(cfg: dict, out: str | Path, resume: bool = False, progress: bool = True) -> dict:
    out = Path(out)
    tcfg = cfg["train"]
    torch.set_num_threads(tcfg["threads"] or os.cpu_count() or 1)
    if cfg["embedding"]["compression"].get("method") == "optembed":  # three stages, one command
        from embtables.pipelines.train.optembed_stages import run_optembed

        training_device(cfg)  # an explicit CUDA request fails here
        return run_optembed(cfg, out, resume=resume, progress=progress)
    check_out_dir(out, resume)
    # Everything that can fail on bad config or data runs before the output dir exists.
    device = training_device(cfg)
    inputs = resolve_inputs(cfg)
    if resume:
        check_resume(out, cfg, inputs)
    torch.manual_seed(tcfg["seed"])
    model = build_model(cfg, inputs, device=device)
    optimizer = make_model_optimizer(tcfg, model)
    created = prepare_out_dir(out, resume)
    try:
        with run_lock(out):
            return _train(cfg, out, inputs, model, optimizer, resume, progress)
    except BaseException:
        if created and not checkpoint_dirs(out):
            shutil.rmtree(out, ignore_errors=True)  # nothing worth keeping: leave no half-written run
        raise


def training_device(cfg: dict) -> torch.device:
    """train.device, resolved once for the whole job (tables, dense network, optimizer, batches)."""
    spec = cfg["train"]["device"]
    try:
        device = resolve_device(spec)
    except ConfigError as e:
        raise ConfigError(f"train.device: {e}") from None
    if cfg["embedding"]["compression"].get("method") == "optembed" and device.type != "cpu":
        # Its search stage scores candidate masks on host copies of held-out embeddings (numpy).
        if spec != "auto":
            raise ConfigError(f"train.device {spec}: embedding.compression.method optembed runs on CPU only "
                              f"(its evolutionary search works on host arrays); use train.device: cpu")
        device = torch.device("cpu")
    return device


def fit(cfg, out, inputs, model, resume: bool = False, progress: bool = True, batch_filter=None) -> dict:
    """Train a built model into an existing run dir (for multi-stage jobs such as optembed).

    `batch_filter(Batch) -> Batch` drops rows before the step (e.g. a held-out search set);
    positions still count the rows read, so resume stays exact.
    """
    return _train(cfg, Path(out), inputs, model, make_model_optimizer(cfg["train"], model), resume, progress,
                  batch_filter)


def _train(cfg, out, inputs, model, optimizer, resume, progress, batch_filter=None) -> dict:
    tcfg = cfg["train"]
    position = {"epoch": 0, "rows_in_epoch": 0, "step": 0, "train_rows_seen": 0, "train_seconds": 0.0,
                "history": []}
    if resume and (ckpt := latest_checkpoint(out)) is not None:
        state = load_checkpoint(ckpt)
        load_model_state(model, state)
        optimizer.load_state_dict(state["optimizer"])
        restore_rng(state.get("rng"))  # dropout / OptEmbed's sampled dims continue where they were
        position = state["position"]
        print(f"resuming from {ckpt.name}: epoch {position['epoch']}, row {position['rows_in_epoch']}")
    write_json_atomic(out / "run.json", run_record(cfg, inputs))
    (out / "config.yaml").write_text(yaml.safe_dump({k: v for k, v in cfg.items() if not k.startswith("_")},
                                                    sort_keys=False))
    emb = model.embeddings
    print(f"embedding: {emb.embedding_bytes():,} bytes (full {emb.full_embedding_bytes():,}, "
          f"{emb.full_embedding_bytes() / emb.embedding_bytes():.1f}x) in {len(emb.tables)} tables, "
          f"backends {sorted(set(emb.lookup.backends))}")
    # bf16: dense network only, loss stays fp32; autocast by the model's device type
    autocast_network(model, tcfg.get("precision", "fp32"), model.device.type)
    with reading_dataset(inputs.dataset):  # no ingest replaces it while this run reads it
        train_loop(LocalRun(cfg, out, inputs, model, optimizer), position, tcfg, progress, batch_filter)
    metrics = run_metrics(cfg, inputs, model, position)
    write_json_atomic(out / "metrics.json", metrics)
    return metrics


class LocalRun:
    """One process: batches of the whole train split, state.pt checkpoints, local evaluation.

    `train_loop` drives any object with these members (the distributed job has its own).
    """

    def __init__(self, cfg, out, inputs, model, optimizer):
        self.cfg, self.out, self.inputs, self.model, self.optimizer = cfg, out, inputs, model, optimizer
        self.device = model.device
        self.train_rows = inputs.stats["splits"]["train"]["rows"]
        self.loss_fn = torch.nn.BCEWithLogitsLoss()
        self.fingerprint = dataset_fingerprint(inputs.dataset)

    def batches(self, epoch: int, position: dict):
        from embtables.pipelines.data.batches import iterate_batches

        check_fingerprint(self.inputs.dataset, self.fingerprint, "this run")  # each epoch: same data
        tcfg = self.cfg["train"]
        depth, workers = prefetch_plan(tcfg["prefetch"])
        batches = iterate_batches(self.inputs.dataset, "train", tcfg["batch_size"], shuffle=True, seed=tcfg["seed"],
                                  epoch=epoch, start_row=position["rows_in_epoch"], workers=workers)
        # read, decode, batch, the KJT's host side (key order, offsets) and pinning for CUDA run
        # ahead of the step on the prefetch thread; the device copy stays in the loop
        keys, pin = self.model.embeddings.input_keys, self.device.type == "cuda"
        return prefetched(batches, depth, transform=lambda b: host_ready(b, keys, pin))

    def to_device(self, batch):
        return to_device(batch, self.model.embeddings.input_keys, self.device)

    def forward(self, batch):
        return self.model(batch.dense[:, self.inputs.dense_index], batch.sparse)

    def loss(self, logits, batch):
        return self.loss_fn(logits, batch.label)

    def finite_flag(self, value) -> torch.Tensor:
        """1 where `value` is finite, as a tensor on its device (reading it is the caller's sync)."""
        return torch.isfinite(value.detach())

    def save(self, position: dict) -> None:
        save_checkpoint(self.out, position["step"], self.model, self.optimizer, position)

    def weights(self) -> list[torch.Tensor]:
        """What a checkpoint holds: the dense parameters and the tables."""
        from embtables.models import LOOKUP_PREFIX

        return ([p for n, p in self.model.named_parameters() if not n.startswith(LOOKUP_PREFIX)]
                + list(self.model.embeddings.lookup.table_weights()))

    def evaluate(self) -> dict:
        return evaluate(self.model, self.inputs.dataset, "valid", self.inputs.dense_index,
                        self.cfg["train"]["eval_batch_size"], prefetch=self.cfg["train"]["prefetch"])


def with_regularization(model, loss: torch.Tensor) -> torch.Tensor:
    """The training loss: the data loss plus the methods' own terms (e.g. OptEmbed's threshold penalty)."""
    reg = model.embeddings.regularization()
    return loss if reg is None else loss + reg


def update(optimizer, loss: torch.Tensor) -> None:
    """One optimizer step on `loss` (the table rows are updated inside backward: fused row-wise Adagrad)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def train_loop(run, position: dict, tcfg: dict, progress: bool, batch_filter=None) -> None:
    """Epochs of steps from `position` on: shared by the single-process and distributed jobs.

    `run` gives batches, forward, loss, save and evaluate (see LocalRun); `position` is updated
    in place (epoch, rows_in_epoch, step, train_rows_seen, train_seconds, history).
    """
    model, optimizer, train_rows = run.model, run.optimizer, run.train_rows
    every = tcfg["checkpoint_every_steps"]
    max_steps = tcfg["max_steps"]
    model.train()
    guard = LossGuard(run)
    while position["epoch"] < tcfg["epochs"] and not _done(position, max_steps):
        epoch = position["epoch"]
        bar = tqdm(total=train_rows, initial=position["rows_in_epoch"], unit="rows", disable=not progress,
                   desc=f"epoch {epoch + 1}/{tcfg['epochs']}", mininterval=1.0)
        batches = run.batches(epoch, position)
        tick = time.perf_counter()
        for batch in batches:
            rows_read = batch.rows
            if batch_filter is not None:
                batch = batch_filter(batch)
            if batch.rows == 0:
                position["rows_in_epoch"] += rows_read
                bar.update(rows_read)
                continue
            batch = run.to_device(batch)  # once per step, after the filter
            loss = with_regularization(model, run.loss(run.forward(batch), batch))
            guard.check(loss, position["step"] + 1, epoch)  # the last good checkpoint stays good
            update(optimizer, loss)
            position["step"] += 1
            position["rows_in_epoch"] += rows_read
            position["train_rows_seen"] += batch.rows
            bar.update(rows_read)
            if position["step"] % tcfg["log_every"] == 0:
                elapsed = position["train_seconds"] + time.perf_counter() - tick
                bar.set_postfix(loss=f"{loss.item():.4f}", rows_s=f"{position['train_rows_seen'] / elapsed:,.0f}")
            if every and position["step"] % every == 0:
                position["train_seconds"] += time.perf_counter() - tick
                tick = time.perf_counter()
                guard.flush()
                _save(run, position)
            if _done(position, max_steps):
                break
        position["train_seconds"] += time.perf_counter() - tick
        guard.flush()
        if hasattr(batches, "close"):  # the prefetch thread, or an abandoned generator
            batches.close()
        bar.close()
        if not _done(position, max_steps) or position["rows_in_epoch"] >= train_rows:
            position["epoch"] += 1
            position["rows_in_epoch"] = 0
        scores = run.evaluate()
        position["history"].append({"epoch": epoch + 1, "step": position["step"], **scores})
        if getattr(run, "verbose", True):  # distributed: rank 0 speaks for the job
            print(f"epoch {epoch + 1}: valid AUC {scores['auc']:.4f}  logloss {scores['logloss']:.4f}", flush=True)
        _save(run, position)


def _save(run, position: dict) -> None:
    """Checkpoint, unless an update made some weight non-finite although its loss was finite:
    then stop, keeping the last good checkpoint. Checked only here, as it reads every weight
    once (tables included), which the checkpoint does anyway; one host sync (`run.finite_flag`
    makes the ranks agree)."""
    ok = torch.stack([torch.isfinite(w).all() for w in run.weights()]).all()
    if not bool(run.finite_flag(torch.where(ok, 0.0, float("nan")))):
        raise EmbtablesError(f"weights are not finite after step {position['step']} (the loss was); training "
                             f"stopped before its checkpoint, the last good checkpoint is kept in {run.out}")
    run.save(position)


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
        "precision": precision_record(cfg["train"].get("precision", "fp32"), model.device.type),  # choice + probe
        "device": str(model.device),
    }
    if "planted" in inputs.stats:
        metrics["planted"] = inputs.stats["planted"]
    return metrics
