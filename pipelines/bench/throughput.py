"""`embtables bench throughput`: DLRM training samples/s on CPU, ours vs TorchRec's own DLRM.

Ours: `embtables train` on Criteo-like synth data (26 features, 13 dense; dim 16, bottom
13-512-256-64-16, top 512-256-1, batch 2048; row-wise Adagrad fused into the lookup, dense
Adagrad) with the fast CPU lookup (cpu_fused), the compiled interaction backward and
the prefetching data pipeline (`--prefetch`, default auto as `embtables train`). The headline run uses `--precision` (auto: bf16 where bf16 matrix products
measure faster, see pipelines/train/precision.py, else fp32); the other precision runs too, so bf16's AUC is compared with fp32's (must be
within 0.001). samples/s are the whole run's (first steps included), from metrics.json.

TorchRec: see pipelines/bench/torchrec_dlrm.py; its batches are decoded beforehand (no loading
cost: a generous baseline), samples/s over the steps after `--torchrec-warmup`. It runs fp32 (as
its example trains) and, where the CPU has bf16, again under bf16 autocast (`torchrec_dlrm_bf16`).

The dense network alone (embeddings free) is timed too: its samples/s bound any end-to-end
figure, and `max_speedup_vs_torchrec_dlrm` is the most any lookup work could buy here.

Whole epoch vs step only (`data_path`, see run_data_path): the same loop over the same
batches, fed by the data pipeline or from memory, alternating in one run.

On a shared machine the two runs may see different load, so a paired measurement follows:
the two models alternate in blocks of steps and the median step times are compared.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

BOTTOM, TOP, DIM = [512, 256, 64], [512, 256], 16


def add_throughput_args(parser) -> None:
    parser.add_argument("--data", default=None, help="encoded dataset dir (default: generate synth criteo26)")
    parser.add_argument("--rows", type=int, default=400_000, help="synth rows when generating")
    parser.add_argument("--cache", default="/tmp/embtables-bench", help="where generated data is kept")
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=None, help="our runs: steps (default: one epoch)")
    parser.add_argument("--precision", default="auto", choices=["fp32", "bf16", "auto"],
                        help="headline run; auto = bf16 where bf16 products measure faster, else fp32")
    parser.add_argument("--backend", default="cpu_fused", help="our lookup backend")
    parser.add_argument("--dense-lr", type=float, default=0.01, help="dense Adagrad lr (both models)")
    parser.add_argument("--table-lr", type=float, default=0.05, help="row-wise Adagrad lr (both models)")
    parser.add_argument("--prefetch", default="auto", type=lambda v: v if v == "auto" else int(v),
                        help="train.prefetch of our runs (auto, batches ahead, 0 = off)")
    parser.add_argument("--data-path-rounds", type=int, default=2,
                        help="whole epoch vs step only: alternating rounds of each (0 = skip)")
    parser.add_argument("--torchrec-steps", type=int, default=40)
    parser.add_argument("--torchrec-warmup", type=int, default=5)
    parser.add_argument("--paired-rounds", type=int, default=6, help="0 = no paired measurement")
    parser.add_argument("--paired-block", type=int, default=5, help="steps per model per round")
    parser.add_argument("--skip-torchrec", action="store_true")
    parser.add_argument("--skip-reference", action="store_true",
                        help="only the headline run (no bf16-vs-fp32 AUC comparison)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)


def synth_dataset(args) -> Path:
    from embtables.pipelines.data.ingest_synth import ingest

    path = Path(args.cache) / f"synth-criteo26-{args.rows}-seed{args.seed}"
    if not (path / "stats.json").is_file():
        print(f"generating {args.rows:,} Criteo-like rows into {path}", flush=True)
        ingest(path, preset="criteo26", rows=args.rows, seed=args.seed)
    return path


def our_config(args, dataset: Path, precision: str) -> dict:
    from embtables.config import load_config

    sets = {"data.train": str(dataset), "model.name": "dlrm", "model.bottom_mlp": BOTTOM, "model.top_mlp": TOP,
            "embedding.dim": DIM, "embedding.backend": args.backend, "embedding.lr": args.table_lr,
            "train.batch_size": args.batch, "train.epochs": 1, "train.optimizer": "adagrad",
            "train.lr": args.dense_lr, "train.precision": precision, "train.seed": args.seed,
            "train.max_steps": args.steps, "train.threads": args.threads, "train.log_every": 1_000_000,
            "train.prefetch": args.prefetch}
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in sets.items()])  # JSON is valid YAML


def run_ours(args, dataset: Path, precision: str, scratch: Path) -> dict:
    from embtables.pipelines.train.local import train

    metrics = train(our_config(args, dataset, precision), scratch / f"ours-{precision}", progress=False)
    print(f"ours ({args.backend}, {precision}): {metrics['samples_per_sec']:,.0f} samples/s, "
          f"valid AUC {metrics['auc']:.4f} after {metrics['steps']} steps", flush=True)
    return {k: metrics[k] for k in ("samples_per_sec", "auc", "logloss", "steps", "train_rows_seen",
                                    "train_seconds", "backends")}


def run_torchrec(args, dataset: Path, bf16: bool = False) -> dict:
    from embtables.pipelines.data.encode import load_stats
    from embtables.pipelines.bench.torchrec_dlrm import (build_torchrec_dlrm, compute_kernels, process_group,
                                                   torchrec_batches, torchrec_step)

    with process_group():
        dmp, optimizer = build_torchrec_dlrm(load_stats(dataset), DIM, BOTTOM, TOP, args.table_lr, args.dense_lr,
                                             args.seed)
        batches = torchrec_batches(dataset, args.batch, args.torchrec_warmup + args.torchrec_steps, args.seed)
        for i, batch in enumerate(batches):
            if i == args.torchrec_warmup:
                tick = time.perf_counter()
            loss = torchrec_step(dmp, optimizer, batch, bf16)
        seconds = time.perf_counter() - tick
        kernels = compute_kernels(dmp)
    rate = args.torchrec_steps * args.batch / seconds
    print(f"torchrec DLRM (DMP, {'bf16 autocast' if bf16 else 'fp32'}): {rate:,.0f} samples/s over "
          f"{args.torchrec_steps} steps, kernels {kernels}", flush=True)
    return {"samples_per_sec": rate, "steps": args.torchrec_steps, "warmup_steps": args.torchrec_warmup,
            "final_loss": float(loss), "compute_kernels": kernels, "precision": "bf16" if bf16 else "fp32"}


def run_data_path(args, dataset: Path, precision: str) -> dict:
    """Whole epoch vs step only, in one run: the same training loop (`train_loop`, as `embtables
    train` runs it) over the same batches in the same order, each arm from a fresh model; once
    fed by the data pipeline (`train.prefetch` as configured), once from batches already in
    memory (read, decoded and prepared beforehand: the step alone). The arms alternate
    `--data-path-rounds` times so both see the same machine load; samples/s are whole-loop means (first
    steps included in both), not medians. Evaluation and checkpoints are left out of both.

    Also reported: the share of each pipeline epoch spent waiting in `next(batches)`, measured
    inside that run (no second arm, so machine-speed drift between arms does not enter it)."""
    from embtables.pipelines.train.build import build_model, resolve_inputs
    from embtables.pipelines.train.local import LocalRun, make_model_optimizer, train_loop
    from embtables.pipelines.train.precision import autocast_network

    cfg = our_config(args, dataset, precision)
    inputs = resolve_inputs(cfg)

    class Arm(LocalRun):
        verbose = False
        cached = None  # batches of the in-memory arm
        waited = None

        def batches(self, epoch, position):
            if self.cached is not None:
                return iter(self.cached)
            self.waited = _Waited(super().batches(epoch, position))
            return self.waited

        def save(self, position):
            pass

        def evaluate(self):
            return {"auc": float("nan"), "logloss": float("nan"), "rows": 0}

    def fresh_run(cached=None) -> Arm:
        torch.manual_seed(args.seed)
        model = build_model(cfg, inputs)
        run = Arm(cfg, Path(tempfile.gettempdir()), inputs, model, make_model_optimizer(cfg["train"], model))
        autocast_network(model, precision)
        run.cached = cached
        return run

    def samples_per_sec(run) -> float:
        position = {"epoch": 0, "rows_in_epoch": 0, "step": 0, "train_rows_seen": 0, "train_seconds": 0.0,
                    "history": []}
        train_loop(run, position, cfg["train"], progress=False)
        if run.waited is not None:
            out["waiting_share"].append(run.waited.seconds / position["train_seconds"])
        return position["train_rows_seen"] / position["train_seconds"]

    batches = fresh_run().batches(0, {"rows_in_epoch": 0})
    memory = list(itertools.islice(batches, args.steps))
    batches.close()
    out = {"pipeline_samples_per_sec": [], "in_memory_samples_per_sec": [], "waiting_share": []}
    samples_per_sec(fresh_run(memory[:5]))  # the process's one-time warm-ups (oneDNN primitives) go first
    for _ in range(args.data_path_rounds):
        out["in_memory_samples_per_sec"].append(samples_per_sec(fresh_run(memory)))
        out["pipeline_samples_per_sec"].append(samples_per_sec(fresh_run()))
    out["whole_epoch_vs_step_only"] = [p / m for p, m in zip(out["pipeline_samples_per_sec"],
                                                               out["in_memory_samples_per_sec"])]
    out["prefetch"] = cfg["train"]["prefetch"]
    print(f"data path ({precision}, prefetch {out['prefetch']}): whole epoch "
          f"{', '.join(f'{x:,.0f}' for x in out['pipeline_samples_per_sec'])} vs step only "
          f"{', '.join(f'{x:,.0f}' for x in out['in_memory_samples_per_sec'])} samples/s → "
          f"{', '.join(f'{x:.3f}' for x in out['whole_epoch_vs_step_only'])}; waiting for data "
          f"{', '.join(f'{x:.1%}' for x in out['waiting_share'])} of each pipeline epoch", flush=True)
    return out


class _Waited:
    """Batches as they come, adding up the time the consumer waited in next()."""

    def __init__(self, source):
        self.source, self.seconds = source, 0.0

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self.source)
        finally:
            self.seconds += time.perf_counter() - start

    def close(self):
        if hasattr(self.source, "close"):
            self.source.close()


def our_stepper(args, dataset: Path, precision: str):
    """One training step of ours per call, exactly as `embtables train` runs it (prefetched batches)."""
    from embtables.pipelines.data.batches import iterate_batches
    from embtables.pipelines.train.precision import autocast_network
    from embtables.pipelines.data.prefetch import Prefetcher
    from embtables.pipelines.train.build import build_model, resolve_inputs
    from embtables.pipelines.train.local import make_model_optimizer, update, with_regularization

    cfg = our_config(args, dataset, precision)
    inputs = resolve_inputs(cfg)
    torch.manual_seed(args.seed)
    model = build_model(cfg, inputs)
    optimizer = make_model_optimizer(cfg["train"], model)
    autocast_network(model, precision)
    model.train()
    source = (b for epoch in itertools.count()
              for b in iterate_batches(dataset, "train", args.batch, shuffle=True, seed=args.seed, epoch=epoch,
                                       drop_last=True))
    batches = Prefetcher(source, depth=2)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def step() -> None:
        batch = next(batches)
        update(optimizer, with_regularization(model, loss_fn(model(batch.dense[:, inputs.dense_index], batch.sparse),
                                                             batch.label)))

    return step, batches


def run_paired(args, dataset: Path, precision: str) -> dict:
    """Alternate blocks of steps of the two models; median step times → samples/s and speedup."""
    from embtables.pipelines.data.encode import load_stats
    from embtables.pipelines.bench.torchrec_dlrm import build_torchrec_dlrm, process_group, torchrec_batches, torchrec_step

    ours, prefetcher = our_stepper(args, dataset, precision)
    with process_group():
        dmp, optimizer = build_torchrec_dlrm(load_stats(dataset), DIM, BOTTOM, TOP, args.table_lr, args.dense_lr,
                                             args.seed)
        trec_batches = itertools.cycle(torchrec_batches(dataset, args.batch, 16, args.seed))
        steps = {"ours": lambda: ours(), "torchrec": lambda: torchrec_step(dmp, optimizer, next(trec_batches))}
        times: dict[str, list[float]] = {name: [] for name in steps}
        cpu: dict[str, list[float]] = {name: [] for name in steps}  # process CPU time, all threads
        for name, fn in steps.items():  # warm-up: first-step allocations, oneDNN primitives
            for _ in range(3):
                fn()
        for _ in range(args.paired_rounds):
            for name, fn in steps.items():
                for _ in range(args.paired_block):
                    tick, cpu_tick = time.perf_counter(), time.process_time()
                    fn()
                    times[name].append(time.perf_counter() - tick)
                    cpu[name].append(time.process_time() - cpu_tick)
    prefetcher.close()
    median = {name: statistics.median(t) for name, t in times.items()}
    out = {f"{name}_step_ms": 1e3 * m for name, m in median.items()}
    out.update({f"{name}_samples_per_sec": args.batch / m for name, m in median.items()})
    out.update({f"{name}_cpu_ms_per_step": 1e3 * statistics.median(t) for name, t in cpu.items()})
    out["speedup"] = median["torchrec"] / median["ours"]
    out["speedup_cpu_time"] = out["torchrec_cpu_ms_per_step"] / out["ours_cpu_ms_per_step"]
    out["steps_each"] = len(times["ours"])
    print(f"paired ({precision}): ours {out['ours_step_ms']:.1f} ms/step ({out['ours_cpu_ms_per_step']:.1f} ms CPU), "
          f"torchrec {out['torchrec_step_ms']:.1f} ms/step ({out['torchrec_cpu_ms_per_step']:.1f} ms CPU) "
          f"→ {out['speedup']:.2f}× wall, {out['speedup_cpu_time']:.2f}× CPU time", flush=True)
    return out


def run_throughput_bench(args) -> dict:
    from embtables.pipelines.bench.dense_bound import dense_bound
    from embtables.pipelines.train.precision import (bf16_supported, cpu_description, precision_record,
                                                     resolve_precision)

    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = Path(args.data) if args.data else synth_dataset(args)
    headline = resolve_precision(args.precision)
    report: dict = {"model": {"bottom": [13, *BOTTOM, DIM], "top": [*TOP, 1], "dim": DIM, "batch": args.batch},
                    "dataset": str(dataset), "backend": args.backend, "precision": headline,
                    "precision_requested": args.precision, "precision_check": precision_record(args.precision),
                    "cpu": cpu_description(), "threads": args.threads or torch.get_num_threads(),
                    "load_average_before": list(os.getloadavg())}
    # The headline run, then the other precision: fp32 is the AUC reference for bf16.
    precisions = [headline] + [p for p in ("fp32", "bf16") if p != headline and not args.skip_reference
                               and (p == "fp32" or bf16_supported("cpu"))]
    scratch = Path(tempfile.mkdtemp(prefix="embtables-throughput-"))
    try:
        for precision in precisions:
            report[f"ours_{precision}"] = run_ours(args, dataset, precision, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report["samples_per_sec"] = report[f"ours_{headline}"]["samples_per_sec"]
    if args.data_path_rounds > 0:  # the acceptance: whole epoch ≥ 95% of the step alone
        report["data_path"] = run_data_path(args, dataset, headline)
        report["whole_epoch_vs_step_only"] = statistics.median(report["data_path"]["whole_epoch_vs_step_only"])
    if "ours_bf16" in report and "ours_fp32" in report:
        delta = report["ours_bf16"]["auc"] - report["ours_fp32"]["auc"]
        report["auc_delta_bf16_vs_fp32"] = delta
        report["bf16_auc_within_0.001_of_fp32"] = abs(delta) <= 0.001
        report["bf16_speedup_vs_fp32"] = report["ours_bf16"]["samples_per_sec"] / report["ours_fp32"]["samples_per_sec"]
    # The dense part alone bounds any end-to-end figure (see pipelines/bench/dense_bound.py).
    report["dense_only"] = {p: dense_bound(13, 26, DIM, BOTTOM, TOP, args.batch, p, lr=args.dense_lr) for p in precisions}
    if not args.skip_torchrec:
        report["torchrec_dlrm"] = run_torchrec(args, dataset)
        torchrec = report["torchrec_dlrm"]["samples_per_sec"]
        report["speedup_vs_torchrec_dlrm"] = report["samples_per_sec"] / torchrec
        report["max_speedup_vs_torchrec_dlrm"] = report["dense_only"][headline]["samples_per_sec"] / torchrec
        if bf16_supported("cpu"):  # the same baseline given bf16 autocast, as ours may use
            report["torchrec_dlrm_bf16"] = run_torchrec(args, dataset, bf16=True)
            report["speedup_vs_torchrec_dlrm_bf16"] = (report["samples_per_sec"]
                                                       / report["torchrec_dlrm_bf16"]["samples_per_sec"])
        if args.paired_rounds > 0:
            report["paired"] = run_paired(args, dataset, headline)
    report["load_average_after"] = list(os.getloadavg())
    return report
