"""Distributed training throughput and memory: samples/s for 1 and 2 Ray workers, peak RSS per
worker, and AUC of each, on synth criteo26 (400k rows) — plus the single-process job for reference.

    .venv/bin/python benchmarks/distributed_bench.py [--rows 400000] [--methods full,qr] [--epochs 1]

Every case trains the same config (DLRM, dim 16, global batch 2048); the Ray cases share one
local Ray cluster started here (2 workers × 0.5 CPU on a 2-core machine). Prints a Markdown
table and writes it with the raw figures under --work.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ensure_data(work: Path, rows: int) -> Path:
    from embtables.pipelines.data.ingest_synth import ingest

    data = work / f"criteo26-{rows}"
    if not (data / "stats.json").is_file():
        ingest(data, preset="criteo26", rows=rows, seed=0)
    return data


def settings(data: Path, method: str, ratio: float, epochs: int, batch: int, workers: int) -> list[str]:
    return [f"data.train={data}", "model.name=dlrm", "embedding.dim=16", f"embedding.compression.method={method}",
            f"embedding.compression.ratio={ratio}", f"train.epochs={epochs}", f"train.batch_size={batch}",
            f"train.workers={workers}", "train.seed=0"]


def single_process(out: Path, sets: list[str]) -> dict:
    """The in-process job in a child process, so its peak RSS is its own."""
    run_cli = ("import resource, sys; from embtables.pipelines.cli.main import main; code = main(sys.argv[1:]); "
               "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)")
    cmd = [sys.executable, "-c", run_cli, "train", str(ROOT / "configs" / "synth_dlrm.yaml"),
           "--out", str(out), "--quiet"] + [a for s in sets for a in ("--set", s)]
    done = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    metrics = json.loads((out / "metrics.json").read_text())
    peak_kb = int(done.stdout.split("PEAK_RSS_KB")[-1].split()[0])
    metrics["peak_rss_mb_per_worker"] = [peak_kb / 1024]
    return metrics


def ray_job(out: Path, sets: list[str]) -> dict:
    from embtables.config import load_config
    from embtables.pipelines.train.distributed import train_distributed

    cfg = load_config(ROOT / "configs" / "synth_dlrm.yaml", sets)
    return train_distributed(cfg, out, address="auto")  # joins the cluster started in main()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=400_000)
    ap.add_argument("--methods", default="full,qr", help="comma list; compressed ones use --ratio")
    ap.add_argument("--ratio", type=float, default=4.0)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--work", type=Path, default=Path("/tmp/embtables-distributed-bench"))
    args = ap.parse_args()

    import ray

    args.work.mkdir(parents=True, exist_ok=True)
    data = ensure_data(args.work, args.rows)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows = []
    for method in args.methods.split(","):
        ratio = 1.0 if method == "full" else args.ratio
        for case, workers in (("1 process", 1), ("Ray, 1 worker", 1), ("Ray, 2 workers", 2)):
            out = args.work / f"{stamp}-{method}-{case.replace(' ', '').replace(',', '-')}"
            sets = settings(data, method, ratio, args.epochs, args.batch_size, workers)
            t0 = time.perf_counter()
            if case == "1 process":
                m = single_process(out, sets)
            else:
                if not ray.is_initialized():
                    from embtables.pipelines.train.distributed import _quiet_logs

                    ray.init(include_dashboard=False, logging_config=_quiet_logs())
                m = ray_job(out, sets)
            rows.append({"method": method, "case": case, "auc": m["auc"], "samples_per_sec": m["samples_per_sec"],
                         "peak_rss_mb": m["peak_rss_mb_per_worker"], "wall_s": time.perf_counter() - t0,
                         "train_rows_seen": m["train_rows_seen"], "table_bytes_per_rank": m.get("table_bytes_per_rank"),
                         "run": str(out)})
            print(json.dumps(rows[-1]), flush=True)
    if ray.is_initialized():
        ray.shutdown()
    lines = ["| method | job | valid AUC | samples/s | peak RSS per worker (MB) | wall s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        rss = ", ".join(f"{x:,.0f}" for x in r["peak_rss_mb"])
        lines.append(f"| {r['method']} | {r['case']} | {r['auc']:.4f} | {r['samples_per_sec']:,.0f} | {rss} | "
                     f"{r['wall_s']:.0f} |")
    table = "\n".join(lines)
    print(table)
    (args.work / f"{stamp}-results.json").write_text(json.dumps(rows, indent=2))
    (args.work / f"{stamp}-results.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
