"""Export benchmark: AUC and bytes per method × precision, and predict throughput on CPU.

For each method: train a run (or reuse WORK/runs/METHOD if it finished), export it at every
precision, score the validation split through the export, and compare with the run's own
validation AUC. Throughput: rows/s of `predict` over the training split (read + encode +
score + write; and model-only), on CPU.

    python benchmarks/export_bench.py --data /tmp/ml --work /tmp/export_bench_ml
    python benchmarks/export_bench.py --data /tmp/syn --work /tmp/export_bench_syn --ratio 10 \
        --set train.epochs=1 --set train.batch_size=2048
    python benchmarks/export_bench.py --data /tmp/ml --work /tmp/export_bench_ml --report --wide
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from embtables.config import load_config
from embtables.pipelines.serve.export import export_run
from embtables.methods import REGISTRY
from embtables.pipelines.serve.predict import predict
from embtables.pipelines.train.local import train

PRECISIONS = ("none", "int8", "int4", "binary")


def trained_run(work: Path, method: str, args) -> tuple[Path, dict]:
    out = work / "runs" / method
    if (out / "metrics.json").is_file():
        return out, json.loads((out / "metrics.json").read_text())
    ratio = 1 if method == "full" else args.ratio
    overrides = [f"data.train={args.data}", f"embedding.compression.method={method}",
                 f"embedding.compression.ratio={ratio}", *args.set]
    print(f"training {method} at ratio {ratio} …", file=sys.stderr)
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the results table
        return out, train(load_config(args.config, overrides), out, progress=False)


def measure(work: Path, method: str, precision: str, run_dir: Path, args) -> dict:
    """precision: none | int8 | int4 | binary | binary:U (U residual bits per dim)."""
    quantize, _, bits = precision.partition(":")
    exp = work / "exports" / f"{method}-{precision.replace(':', '')}"
    export_run(run_dir, exp, quantize=quantize, binary_bits=int(bits or args.binary_bits))
    manifest = json.loads((exp / "manifest.json").read_text())
    scored = predict(exp, args.data, work / "pred" / f"{exp.name}.parquet", progress=False)
    speed = predict(exp, args.data, work / "pred" / "speed.parquet", split=args.throughput_split,
                    batch_size=args.batch_size, progress=False) if args.throughput_split else scored
    b = manifest["bytes"]
    tensors = sum(manifest["files"][f]["bytes"] for f in ("embeddings.safetensors", "dense.safetensors"))
    return {"method": method, "precision": precision, "auc": scored["auc"], "logloss": scored["logloss"],
            "embedding_bytes": b["embedding"], "fp32_embedding_bytes": b["embedding_fp32"],
            "full_embedding_bytes": b["full_embedding_fp32"], "dense_bytes": b["dense"],
            "tensor_file_bytes": tensors, "artifact_bytes": sum(f["bytes"] for f in manifest["files"].values()),
            "rows_per_sec": speed["rows_per_sec"], "score_rows_per_sec": speed["score_rows_per_sec"],
            "backends": scored["backends"]}


def table(rows: list[dict], trained: dict) -> str:
    lines = ["| method | precision | AUC | ΔAUC vs trained | embedding bytes | vs fp32 export | vs full fp32 "
             "| files on disk / (emb + dense) | predict rows/s (model only) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = trained[r["method"]]
        on_disk = r["tensor_file_bytes"] / (r["embedding_bytes"] + r["dense_bytes"])
        lines.append(
            f"| {r['method']} | {r['precision']} | {r['auc']:.4f} | {r['auc'] - t['auc']:+.4f} | "
            f"{r['embedding_bytes']:,} | {r['embedding_bytes'] / r['fp32_embedding_bytes']:.1%} | "
            f"{r['full_embedding_bytes'] / r['embedding_bytes']:.1f}× | {on_disk:.3f} | "
            f"{r['rows_per_sec']:,.0f} ({r['score_rows_per_sec']:,.0f}) |")
    return "\n".join(lines)


def wide_table(rows: list[dict], trained: dict) -> str:
    """One line per method: AUC (bytes vs the fp32 export) per precision, and the largest
    files-on-disk / (embedding + dense bytes) over its exports."""
    precisions = list(dict.fromkeys(r["precision"] for r in rows))
    lines = ["| method | trained AUC | fp32 export ΔAUC | fp32 embedding bytes | "
             + " | ".join(f"{p} AUC (bytes vs fp32)" for p in precisions if p != "none")
             + " | on disk / counted (max) |",
             "|---" * (len(precisions) + 4) + "|"]
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = {r["precision"]: r for r in rows if r["method"] == method}
        fp32 = mine.get("none")
        cells = [f"{mine[p]['auc']:.4f} ({mine[p]['embedding_bytes'] / mine[p]['fp32_embedding_bytes']:.1%})"
                 if p in mine else "—" for p in precisions if p != "none"]
        disk = max(r["tensor_file_bytes"] / (r["embedding_bytes"] + r["dense_bytes"]) for r in mine.values())
        lines.append(f"| {method} | {trained[method]['auc']:.4f} | "
                     f"{fp32['auc'] - trained[method]['auc']:+.4f} | {fp32['embedding_bytes']:,} | "
                     if fp32 else f"| {method} | {trained[method]['auc']:.4f} | — | — | ")
        lines[-1] += " | ".join(cells) + f" | {disk:.3f} |"
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="encoded dataset (embtables data …)")
    p.add_argument("--work", required=True, help="scratch dir for runs, exports, predictions")
    p.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"))
    p.add_argument("--methods", default=None, help="comma-separated (default: every registered method; "
                                                   "optembed runs its three stages)")
    p.add_argument("--ratio", type=float, default=10.0, help="compression ratio of the non-full methods")
    p.add_argument("--precisions", default=",".join(PRECISIONS), help="e.g. none,int8,int4,binary,binary:2")
    p.add_argument("--binary-bits", type=int, default=1, help="bits per dim of a plain 'binary'")
    p.add_argument("--throughput-split", default="train", help="split scored for rows/s ('' = the valid run)")
    p.add_argument("--batch-size", type=int, default=16384)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--report", action="store_true", help="only print the table of WORK/results.json")
    p.add_argument("--wide", action="store_true", help="one line per method, a column per precision")
    args = p.parse_args(argv)
    work = Path(args.work)
    methods = args.methods.split(",") if args.methods else list(REGISTRY)
    if args.report:
        methods = []
    saved = work / "results.json"  # merged across invocations (e.g. one that only adds binary:2)
    results = json.loads(saved.read_text()) if saved.is_file() else {"rows": [], "trained": {}}
    for method in methods:
        try:
            run_dir, metrics = trained_run(work, method, args)
        except Exception as e:  # a method not written / wired in yet: say so, keep going
            print(f"skipping {method}: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        results["trained"][method] = metrics
        for precision in args.precisions.split(","):
            try:
                r = {**measure(work, method, precision, run_dir, args), "precision": precision}
            except Exception as e:  # e.g. a run trained by older method code: report, keep going
                print(f"skipping {method} {precision}: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            results["rows"] = [x for x in results["rows"] if (x["method"], x["precision"]) != (method, precision)]
            results["rows"].append(r)
            saved.write_text(json.dumps(results, indent=1, default=str))  # after each: a crash loses nothing
            print(f"{method:12s} {precision:8s} AUC {r['auc']:.4f} (trained {metrics['auc']:.4f})  "
                  f"{r['embedding_bytes']:>10,} B  {r['rows_per_sec']:,.0f} rows/s", file=sys.stderr)
    order = {m: i for i, m in enumerate(REGISTRY)}
    rank = lambda p: (PRECISIONS.index(p.partition(":")[0]), p)  # noqa: E731
    rows = sorted(results["rows"], key=lambda r: (order.get(r["method"], 99), rank(r["precision"])))
    print((wide_table if args.wide else table)(rows, results["trained"]))


if __name__ == "__main__":
    main()
