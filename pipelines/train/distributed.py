"""`embtables train` with train.workers > 1 or --address: Ray Train workers, sharded tables.

Driver: validates the config, starts a local Ray cluster sized for the machine (or joins
`--address`), and runs a TorchTrainer whose workers each get a streaming split of the train and
valid Parquet (Ray Data). Worker: the model with a TorchRec EBC sharded by
DistributedModelParallel (dense and method parameters under DDP, row-wise Adagrad fused into
the tables' backward), the same step loop as one process (pipelines.train.train_loop), sharded
atomic checkpoints (pipelines.dist_checkpoint) reported to Ray Train, exact AUC over the whole
valid split gathered from all ranks.

`train.batch_size` is the global batch: each step, the ranks' batches add up to it. Ranks step
in lockstep (one all-reduce of the row count per step); a rank whose split ran dry trains on a
zero-weight padding row until all are done, so no row is dropped or duplicated.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from embtables.errors import ConfigError, EmbtablesError
from embtables.pipelines.data.prefetch import prefetch_plan, prefetched
from embtables.pipelines.data.identity import check_fingerprint, dataset_fingerprint, reading_dataset

DATA_CPU_SHARE = 0.25  # of the cluster's CPUs kept for Ray Data (at least one CPU)


def train_distributed(cfg: dict, out, resume: bool = False, address: str | None = None,
                      progress: bool = True) -> dict:
    from embtables.pipelines.train.build import resolve_inputs
    from embtables.pipelines.train.checkpoint import checkpoint_dirs, write_json_atomic
    from embtables.pipelines.train.local import check_out_dir, prepare_out_dir, train
    from embtables.pipelines.train.run_identity import check_resume, run_record
    from embtables.pipelines.train.run_lock import run_lock

    tcfg = cfg["train"]
    if tcfg["workers"] == 1 and address is None and not _ray_connected():
        return train(cfg, out, resume=resume, progress=progress)  # one worker: in-process
    if cfg["embedding"]["compression"].get("method") == "optembed":
        raise ConfigError("embedding.compression.method optembed runs single-process only (train.workers: 1)")
    out = Path(out).resolve()
    check_out_dir(out, resume)
    inputs = resolve_inputs(cfg)  # bad config or data fails before the run dir exists
    if resume:
        check_resume(out, cfg, inputs)
    created = prepare_out_dir(out, resume)
    try:
        with run_lock(out), reading_dataset(inputs.dataset):  # the job's run dir, and no ingest replaces its data
            write_json_atomic(out / "run.json", run_record(cfg, inputs))
            (out / "config.yaml").write_text(yaml.safe_dump({k: v for k, v in cfg.items() if not k.startswith("_")},
                                                            sort_keys=False))
            _run_trainer(cfg, out, inputs, address)
    except BaseException:
        if created and not checkpoint_dirs(out):
            shutil.rmtree(out, ignore_errors=True)
        raise
    return json.loads((out / "metrics.json").read_text())


def _ray_connected() -> bool:
    import ray

    return ray.is_initialized()


def _run_trainer(cfg, out: Path, inputs, address: str | None) -> None:
    import ray
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from embtables.pipelines.data.ray_data import all_rows_data_config, dataset
    from embtables.pipelines.train.checkpoint import KEEP
    from embtables.pipelines.train.sharding import allowed_sharding

    tcfg = cfg["train"]
    started = False
    if not ray.is_initialized():
        if address is None:  # embedded: a local cluster for this job only
            ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, logging_config=_quiet_logs())
            started = True
        else:
            ray.init(address=address, logging_config=_quiet_logs())
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        workers = tcfg["workers"]
        total_cpus = ray.cluster_resources().get("CPU", 1.0)
        use_gpu = _use_gpu(tcfg["device"], workers, ray.cluster_resources().get("GPU", 0.0))
        allowed_sharding(tcfg["sharding"], torch.device("cuda" if use_gpu else "cpu"))  # fail before starting
        # Fractional CPUs per worker so Ray Data's read tasks always find a free CPU.
        cpus = max(0.1, (total_cpus - max(1.0, DATA_CPU_SHARE * total_cpus)) / workers)
        threads = tcfg["threads"] or max(1, int(cpus))
        stats = inputs.stats
        block_rows = 4 * max(1, tcfg["batch_size"] // workers)
        datasets = {"train": dataset(inputs.dataset, stats, "train", block_rows, shuffle_seed=tcfg["seed"]),
                    "valid": dataset(inputs.dataset, stats, "valid", 4 * max(1, tcfg["eval_batch_size"] // workers))}
        # Workers get the encoded dataset by absolute path (their working directory differs).
        worker_cfg = {**cfg, "data": {**cfg["data"], "train": str(Path(inputs.dataset).resolve()), "valid": None}}
        trainer = TorchTrainer(
            _worker,
            train_loop_config={"cfg": worker_cfg, "out": str(out), "threads": threads},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus}),
            run_config=RunConfig(name=f"train-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
                                 storage_path=str(out / "ray"),
                                 failure_config=FailureConfig(max_failures=tcfg["max_failures"]),
                                 checkpoint_config=CheckpointConfig(num_to_keep=KEEP)),
            datasets=datasets, dataset_config=all_rows_data_config())
        try:
            trainer.fit()
        except Exception as e:  # the worker's exception comes wrapped with its traceback: keep its last line
            last = next((line for line in reversed(str(e).splitlines()) if line.strip()), type(e).__name__)
            raise EmbtablesError(f"distributed training failed: {last.strip()}") from e
    finally:
        if started:
            ray.shutdown()


def _use_gpu(device: str, workers: int, cluster_gpus: float) -> bool:
    """train.device for Ray workers (one GPU each, NCCL): auto takes GPUs when the cluster has one
    per worker; an explicit cuda that the cluster cannot give is an error, never a CPU run."""
    if device == "cpu":
        return False
    if device == "auto":
        return cluster_gpus >= workers
    if cluster_gpus < workers:
        raise ConfigError(f"train.device {device}: {workers} workers need {workers} GPUs, the Ray cluster has "
                          f"{cluster_gpus:g}; use fewer train.workers or train.device: cpu")
    return True  # Ray assigns each worker its GPU (a cuda:N index does not apply across workers)


def _quiet_logs():
    """Errors only from Ray's own loggers in every process (our progress lines are prints)."""
    import ray

    return ray.LoggingConfig(encoding="TEXT", log_level="ERROR")


def _quiet_libraries() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", module=r"torchrec\..*")
    for name in ("torchrec", "fbgemm_gpu", "torch.distributed", ""):
        logging.getLogger(name).setLevel(logging.ERROR)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("torchrec", "fbgemm_gpu")):
            logging.getLogger(name).setLevel(logging.ERROR)


@dataclass
class Step:
    local: object   # this rank's Batch (a zero-weight padding row once its split ran dry)
    rows: int       # rows of this step over all ranks


class DistributedRun:
    """What train_loop needs, for one rank of the job (see pipelines.train.LocalRun)."""

    def __init__(self, cfg, out: Path, inputs, model, dmp, optimizer, plan: dict, restored: tuple | None,
                 device: torch.device):
        import ray.train
        import torch.distributed as dist

        self.cfg, self.out, self.inputs = cfg, out, inputs
        self.model, self.dmp, self.optimizer, self.plan, self.device = model, dmp, optimizer, plan, device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.verbose = self.rank == 0
        self.train_rows = inputs.stats["splits"]["train"]["rows"]
        self.train_shard = ray.train.get_dataset_shard("train")
        self.valid_shard = ray.train.get_dataset_shard("valid")
        tcfg = cfg["train"]
        self.batch_size = _local_size(tcfg["batch_size"], self.rank, self.world)
        self.eval_batch_size = _local_size(tcfg["eval_batch_size"], self.rank, self.world)
        self.skip_epoch, self.skip = (restored[0]["epoch"], restored[1]) if restored else (-1, None)
        self.consumed: list[np.ndarray] = []
        self.fingerprint = dataset_fingerprint(inputs.dataset)

    # --- batches -------------------------------------------------------------------------
    def batches(self, epoch: int, position: dict):
        from embtables.pipelines.data.ray_data import shard_batches

        check_fingerprint(self.inputs.dataset, self.fingerprint, "this run")  # each epoch: same data

        skip = self.skip if epoch == self.skip_epoch else None
        # Rows trained before the resume stay recorded (once: on rank 0) for the next checkpoint.
        self.consumed = [skip] if skip is not None and self.rank == 0 else []
        seed = self.cfg["train"]["seed"]
        local = shard_batches(self.train_shard, self.inputs.stats, "train", self.batch_size, skip=skip,
                              shuffle_buffer=max(4 * self.batch_size, 16384),
                              seed=(seed * 1_000_003 + epoch) * 1000 + self.rank)
        # as in one process: decoding and the KJT build run ahead of the step (Ray prefetches blocks only)
        depth, _ = prefetch_plan(self.cfg["train"]["prefetch"])
        return self._lockstep(prefetched(local, depth), record=True)

    def _lockstep(self, local, record: bool):
        import torch.distributed as dist

        from embtables.pipelines.data.ray_data import padding_batch

        pad = padding_batch(self.inputs.stats)
        it = iter(local)
        try:
            while True:
                batch = next(it, None)
                count = torch.tensor([batch.rows if batch is not None else 0], dtype=torch.int64, device=self.device)
                dist.all_reduce(count)
                if int(count) == 0:
                    return
                if batch is not None and record:
                    self.consumed.append(batch.hashes)
                yield Step(batch if batch is not None else pad, int(count))
        finally:  # left early (max_steps): stop the prefetch thread
            if hasattr(it, "close"):
                it.close()

    # --- step ----------------------------------------------------------------------------
    def to_device(self, step: Step) -> Step:
        return step  # forward and loss move this rank's tensors (DMP takes the KJT as it is)

    def forward(self, step: Step):
        local = step.local
        return self.dmp(local.dense[:, self.inputs.dense_index].to(self.device), local.sparse.to(self.device))

    def loss(self, logits, step: Step):
        # Σ local BCE / (global rows / world): DDP's mean over ranks makes it the global mean.
        weight = 1.0 if step.local.rows else 0.0
        label = step.local.label.to(self.device)
        return F.binary_cross_entropy_with_logits(logits, label, reduction="sum") * (
            weight * self.world / step.rows)

    def finite_flag(self, value) -> torch.Tensor:
        """1 where `value` is finite on every rank (one all-reduce, no host sync), so all ranks
        stop at the same step."""
        import torch.distributed as dist

        ok = torch.isfinite(value.detach()).to(torch.float32).reshape(1)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return ok[0] > 0

    # --- checkpoints and evaluation ----------------------------------------------------
    def save(self, position: dict) -> None:
        import ray.train

        from embtables.pipelines.train.dist_checkpoint import save_sharded

        consumed = (np.concatenate(self.consumed) if self.consumed and position["rows_in_epoch"]
                    else np.zeros(0, np.uint64))  # rows_in_epoch 0: a new epoch, nothing consumed yet
        path = save_sharded(self.out, position["step"], self.dmp, self.optimizer, position, consumed, self.plan)
        metrics = {"step": position["step"], "epoch": position["epoch"], "train_rows_seen": position["train_rows_seen"]}
        if self.rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:  # Ray Train keeps a pointer; the shards stay in RUN/
            (Path(tmp) / "pointer.json").write_text(json.dumps({"path": str(path)}))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    def weights(self) -> list[torch.Tensor]:
        """What this rank's checkpoint holds: the dense parameters and its shards of the tables."""
        from embtables.models import LOOKUP_PREFIX
        from embtables.pipelines.train.sharding import sharded_tables

        return ([p for n, p in self.model.named_parameters() if not n.startswith(LOOKUP_PREFIX)]
                + [s.tensor for t in sharded_tables(self.dmp).values() for s in t.local_shards()])

    @torch.no_grad()
    def evaluate(self) -> dict:
        import torch.distributed as dist

        from embtables.metrics import log_loss, roc_auc
        from embtables.pipelines.data.ray_data import shard_batches

        local = shard_batches(self.valid_shard, self.inputs.stats, "valid", self.eval_batch_size)
        labels, probs = [], []
        self.dmp.eval()
        for step in self._lockstep(local, record=False):
            logits = self.forward(step)
            if step.local.rows:
                labels.append(step.local.label.numpy())
                probs.append(torch.sigmoid(logits.float()).cpu().numpy())
        self.dmp.train()
        parts = [None] * self.world
        dist.all_gather_object(parts, (np.concatenate(labels) if labels else np.zeros(0, np.float32),
                                       np.concatenate(probs) if probs else np.zeros(0, np.float32)))
        y = np.concatenate([p[0] for p in parts])
        p = np.concatenate([p[1] for p in parts])
        return {"auc": roc_auc(y, p), "logloss": log_loss(y, p), "rows": int(y.size)}


def _local_size(total: int, rank: int, world: int) -> int:
    return max(1, total // world + (1 if rank < total % world else 0))


def _worker(config: dict) -> None:
    """One Ray Train worker (rank) of the job."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from embtables.kernels.lookup import seeded_initial_weights
    from embtables.pipelines.train.checkpoint import latest_checkpoint, write_json_atomic
    from embtables.pipelines.train.dist_checkpoint import is_sharded_checkpoint, load_sharded
    from embtables.pipelines.train.precision import autocast_network
    from embtables.pipelines.train.build import build_model, resolve_inputs
    from embtables.pipelines.train.sharding import (format_plan, load_full_tables, plan_sharding, plan_summary,
                                                    shard_model, sharded_lookup)
    from embtables.pipelines.train.local import make_model_optimizer, run_metrics, train_loop

    _quiet_libraries()  # after the imports above: some libraries set their loggers up on import
    cfg, out = config["cfg"], Path(config["out"])
    tcfg = cfg["train"]
    torch.set_num_threads(config["threads"])
    rank, world = dist.get_rank(), dist.get_world_size()
    (out / "ray").mkdir(exist_ok=True)
    (out / "ray" / f"worker-rank-{rank}.pid").write_text(f"{os.getpid()}\n")  # to find (or kill) a rank
    device = ray.train.torch.get_device()
    inputs = resolve_inputs(cfg)
    torch.manual_seed(tcfg["seed"])  # same dense init on every rank (DDP also broadcasts rank 0's)
    lr, eps = cfg["embedding"]["lr"], cfg["embedding"]["eps"]
    model = build_model(cfg, inputs, sharded_lookup=lambda tables, keys: sharded_lookup(tables, keys, lr, eps))
    plan, sharders = plan_sharding(model, world, tcfg["sharding"], device, _local_size(tcfg["batch_size"], 0, world))
    summary = plan_summary(plan, model.embeddings, world)
    dmp = shard_model(model, plan, sharders, device)
    optimizer = make_model_optimizer(tcfg, model)
    if rank == 0:
        print(format_plan(summary), flush=True)
        write_json_atomic(out / "plan.json", summary)

    restored = None
    # A fresh run starts in an empty dir, so a checkpoint here means --resume or a restart after
    # a worker failure (Ray Train also holds a pointer to it: ray.train.get_checkpoint()).
    ckpt = latest_checkpoint(out)
    if ckpt is not None:
        if not is_sharded_checkpoint(ckpt):
            raise EmbtablesError(f"{ckpt} was written by a single-process run; resume it with train.workers: 1")
        restored = load_sharded(ckpt, dmp, optimizer)
        if rank == 0:
            p = restored[0]
            print(f"resuming from {ckpt.name}: epoch {p['epoch']}, {p['rows_in_epoch']} rows into it, "
                  f"{restored[1].size} rows recorded as trained", flush=True)
    else:  # the same per-table init as one process, cut into this rank's shards
        tables = {t.name: t for t in model.embeddings.tables}
        load_full_tables(dmp, lambda name: seeded_initial_weights([tables[name]], tcfg["seed"])[0])
    position = dict(restored[0]) if restored else {"epoch": 0, "rows_in_epoch": 0, "step": 0,
                                                   "train_rows_seen": 0, "train_seconds": 0.0, "history": []}
    run = DistributedRun(cfg, out, inputs, model, dmp, optimizer, summary, restored, device)
    autocast_network(model, tcfg.get("precision", "fp32"), device.type)
    train_loop(run, position, tcfg, progress=False)

    rss = [None] * world
    dist.all_gather_object(rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if rank == 0:
        metrics = run_metrics(cfg, inputs, model, position)
        metrics.update({"workers": world, "device": str(device), "peak_rss_mb_per_worker": rss,
                        "sharding": {n: t["sharding"] for n, t in summary["tables"].items()},
                        "table_bytes_per_rank": summary["bytes_per_rank"]})
        write_json_atomic(out / "metrics.json", metrics)
    ray.train.report({"done": 1, "train_rows_seen": position["train_rows_seen"]})
