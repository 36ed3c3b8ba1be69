"""Ingest benchmark (issue 15): raw Parquet like Criteo's, then `embtables data parquet` timed.

    python benchmarks/ingest_bench.py gen DIR [--rows 4000000 --files 8]
    python benchmarks/ingest_bench.py run DIR OUT --workers before,1,2,default --before OLD/.venv/bin/python [--repeats 3]

`gen` writes DIR/part-*.parquet: label `y`, 13 dense columns (I1..I13, float64 with ~10% nulls) and
26 sparse int64 columns (C1..C26, ~5% nulls) whose power-law ids total ~3.8M distinct values at 4M
rows (Criteo's shape: a few huge columns, many small ones). `run` runs the CLI in a child process
under /usr/bin/time -v per worker count, `--repeats` times, interleaved so load hits all alike,
and prints rows/s and peak RSS (min / median) plus the CPU model, flags and load.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# Possible ids per sparse column; the power law below leaves ~3.8M distinct ones in 4M rows.
CARDINALITIES = [1_250_000, 1_000_000, 750_000, 500_000, 330_000, 200_000, 120_000, 60_000,
                 30_000, 15_000, 8_000, 4_000, 2_000, 1_000, 500, 300, 200, 100, 60, 30, 20, 10, 5, 4, 3, 2]


def gen(out: Path, rows: int, files: int, seed: int, row_group: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    per = -(-rows // files)
    for f in range(files):
        n = min(per, rows - f * per)
        cols = {"y": (rng.random(n) < 0.25).astype(np.int64)}
        for j in range(13):
            x = rng.lognormal(2.0, 1.5, n)
            cols[f"I{j + 1}"] = pa.array(x, mask=rng.random(n) < 0.1)
        for j, card in enumerate(CARDINALITIES):
            # ids = card * u^3: a heavy head and a long tail seen once or twice.
            ids = (card * rng.random(n) ** 3).astype(np.int64) * 7919 + j
            cols[f"C{j + 1}"] = pa.array(ids, mask=rng.random(n) < 0.05)
        pq.write_table(pa.table(cols), out / f"part-{f:05d}.parquet", row_group_size=row_group)
    distinct = sum(len(pa.chunked_array(pq.read_table(out, columns=[f"C{j + 1}"]).column(0)).unique())
                   for j in range(len(CARDINALITIES)))
    print(f"{out}: {rows:,} rows in {files} files, {distinct:,} distinct sparse ids (incl. null)")


def cpu_info() -> str:
    model, flags = platform.processor(), ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = re.search(r"model name\s*:\s*(.*)", text).group(1)
        flags = re.search(r"flags\s*:\s*(.*)", text).group(1)
    except (OSError, AttributeError):
        pass
    wanted = [f for f in flags.split() if f.startswith(("avx", "amx", "sse4", "bmi"))]
    return f"{model}, {os.cpu_count()} cores, flags: {' '.join(wanted)}"


CLI = "import sys; from embtables.pipelines.cli.main import main; sys.exit(main())"  # = `embtables`


def run_once(raw: Path, out: Path, workers: str, extra: list[str], before: str | None) -> tuple[float, float, float]:
    """(seconds, peak RSS in MB, CPU seconds) of one `embtables data parquet` child ("before": the other CLI)."""
    sparse = ",".join(f"C{j + 1}" for j in range(len(CARDINALITIES)))
    dense = ",".join(f"I{j + 1}" for j in range(13))
    exe = before if workers == "before" else sys.executable
    flags = [] if workers in ("before", "default") else ["--workers", workers]
    cmd = ["/usr/bin/time", "-v", exe, "-c", CLI, "data", "parquet", str(raw), str(out),
           "--label", "y", "--sparse", sparse, "--dense", dense, *flags, *extra]
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd="/")  # import the installed package, not ./
    seconds = time.perf_counter() - t0
    if p.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr[-2000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    cpu = sum(float(re.search(rf"{k} time \(seconds\): ([\d.]+)", p.stderr).group(1)) for k in ("User", "System"))
    return seconds, rss_kb / 1024, cpu


def run(raw: Path, out: Path, workers: list[str], repeats: int, extra: list[str], before: str | None) -> None:
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in sorted(raw.glob("*.parquet")))
    print(cpu_info())
    print(f"load before: {os.getloadavg()}")
    got: dict[str, list[tuple[float, float, float]]] = {w: [] for w in workers}
    for r in range(repeats):
        for w in workers:
            s, mb, cpu = run_once(raw, out, w, extra, before)
            got[w].append((s, mb, cpu))
            print(f"  repeat {r + 1} workers {w}: {s:.1f} s, {rows / s:,.0f} rows/s, peak RSS {mb:,.0f} MB, "
                  f"{cpu:.1f} CPU s ({100 * cpu / s:.0f}% of a core; load {os.getloadavg()[0]:.2f})", flush=True)
    import json
    stats = json.loads((out / "stats.json").read_text())
    ids = sum(f["vocab_size"] for f in stats["features"].values())
    print(f"load after: {os.getloadavg()}; {rows:,} rows, {ids:,} ids in the vocabularies")
    print("| workers | rows/s min / median | seconds min / median | CPU s median (cores busy) "
          "| peak RSS MB min / median | MB per 1M ids |")
    print("|---|---|---|---|---|---|")
    for w, xs in got.items():
        rate = sorted(rows / s for s, _, _ in xs)
        secs = sorted(s for s, _, _ in xs)
        mbs = sorted(mb for _, mb, _ in xs)
        cpu = statistics.median(c for _, _, c in xs)
        print(f"| {w} | {rate[0]:,.0f} / {statistics.median(rate):,.0f} | {secs[0]:.1f} / "
              f"{statistics.median(secs):.1f} | {cpu:.1f} ({cpu / statistics.median(secs):.2f}) | "
              f"{mbs[0]:,.0f} / {statistics.median(mbs):,.0f} | "
              f"{statistics.median(mbs) / (ids / 1e6):,.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gen")
    g.add_argument("out", type=Path)
    g.add_argument("--rows", type=int, default=4_000_000)
    g.add_argument("--files", type=int, default=8)
    g.add_argument("--row-group", type=int, default=131072)
    g.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("run")
    r.add_argument("raw", type=Path)
    r.add_argument("out", type=Path)
    r.add_argument("--workers", default="1,2",
                   help="worker counts to compare; 'default' runs without --workers, 'before' runs --before")
    r.add_argument("--before", default=None, help="the python of an older checkout (its CLI has no --workers)")
    r.add_argument("--repeats", type=int, default=3)
    r.add_argument("extra", nargs="*", help="more CLI flags after --")
    a = ap.parse_args()
    if a.cmd == "gen":
        gen(a.out, a.rows, a.files, a.seed, a.row_group)
    else:
        run(a.raw, a.out, a.workers.split(","), a.repeats, a.extra, a.before)


if __name__ == "__main__":
    main()
