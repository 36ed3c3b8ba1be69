"""Tradeoff sweep results: one CSV row per cell, a mean ± std summary per (method, ratio), the table."""
from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

from embtables.atomic import atomic_file

COLUMNS = ["method", "ratio", "seed", "status", "embedding_bytes", "full_embedding_bytes", "achieved_ratio",
           "auc", "logloss", "samples_per_sec", "train_seconds", "planted_auc", "note"]
NUMERIC = ["embedding_bytes", "full_embedding_bytes", "achieved_ratio", "auc", "logloss", "samples_per_sec",
           "train_seconds", "planted_auc"]
# A method may land a hair above its budget from float rounding; more than this is reported.
BUDGET_SLACK = 0.999


def cell_row(cell, record: dict) -> dict:
    """The CSV row of one finished cell (trained or unreachable)."""
    row = {"method": cell.method, "ratio": cell.ratio, "seed": cell.seed, "status": record["status"]}
    if record["status"] != "ok":
        return {**{k: math.nan for k in NUMERIC}, **row, "note": record.get("reason", "")}
    planted = (record.get("planted") or {}).get("valid_auc", math.nan)
    missed = record["compression_ratio"] < cell.ratio * BUDGET_SLACK
    return {**row, "embedding_bytes": record["embedding_bytes"],
            "full_embedding_bytes": record["full_embedding_bytes"], "achieved_ratio": record["compression_ratio"],
            "auc": record["auc"], "logloss": record["logloss"], "samples_per_sec": record["samples_per_sec"],
            "train_seconds": record["train_seconds"], "planted_auc": planted,
            "note": "budget missed" if missed else ""}


def write_csv(path: Path, rows: list[dict]) -> None:
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})


def read_csv(path: str | Path) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["ratio"], row["seed"] = float(row["ratio"]), int(row["seed"])
        for key in NUMERIC:
            row[key] = float(row[key]) if row[key] != "" else math.nan
    return rows


def _stats(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(rows: list[dict]) -> list[dict]:
    """One entry per (method, ratio) in first-seen order: mean/std of every figure over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["ratio"]), []).append(row)
    ref = [r["auc"] for r in rows if r["method"] == "full" and r["status"] == "ok"]
    full_auc = statistics.fmean(ref) if ref else math.nan
    out = []
    for (method, ratio), members in groups.items():
        ok = [r for r in members if r["status"] == "ok"]
        entry = {"method": method, "ratio": ratio, "seeds": len(ok), "status": "ok" if ok else members[0]["status"],
                 "note": "; ".join(sorted({r["note"] for r in members if r["note"]}))}
        for key in NUMERIC:
            entry[key], entry[f"{key}_std"] = _stats([r[key] for r in ok])
        entry["auc_drop"] = full_auc - entry["auc"]
        entry["auc_drop_rel"] = entry["auc_drop"] / full_auc
        out.append(entry)
    return out


def _pm(mean: float, std: float, fmt: str) -> str:
    if math.isnan(mean):
        return "—"
    return f"{mean:{fmt}}" + (f" ± {std:{fmt}}" if std > 0 else "")


def markdown_table(summary: list[dict]) -> str:
    """The results table; unreachable cells get a numbered footnote with the solve's reason."""
    lines = ["| method | ratio | achieved | embedding bytes | AUC | ΔAUC vs full | logloss | samples/s | train s | seeds |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    notes = []
    for e in summary:
        if e["status"] != "ok":
            notes.append(f"{e['method']} at {e['ratio']:g}×: {e['note']}")
            lines.append(f"| {e['method']} | {e['ratio']:g} | {e['status']} [{len(notes)}] | — | — | — | — | — | — | 0 |")
            continue
        achieved = f"{e['achieved_ratio']:.1f}×" + (" (budget missed)" if "budget missed" in e["note"] else "")
        drop = ("reference" if e["method"] == "full" else
                f"{-e['auc_drop']:+.4f} ({-100 * e['auc_drop_rel']:+.2f}%)" if not math.isnan(e["auc_drop"]) else "—")
        lines.append(f"| {e['method']} | {e['ratio']:g} | {achieved} | {e['embedding_bytes']:,.0f} | "
                     f"{_pm(e['auc'], e['auc_std'], '.4f')} | {drop} | {_pm(e['logloss'], e['logloss_std'], '.4f')} | "
                     f"{_pm(e['samples_per_sec'], e['samples_per_sec_std'], ',.0f')} | "
                     f"{_pm(e['train_seconds'], e['train_seconds_std'], '.0f')} | {e['seeds']} |")
    if notes:
        lines.append("")
        lines += [f"[{i}] {text}" for i, text in enumerate(notes, 1)]
    return "\n".join(lines) + "\n"


def sweep_header(meta: dict, summary: list[dict]) -> str:
    cfg = meta.get("config", {})
    model, emb, tr = cfg.get("model", {}), cfg.get("embedding", {}), cfg.get("train", {})
    full = next((e for e in summary if e["method"] == "full" and e["status"] == "ok"), None)
    parts = [f"data `{cfg.get('data', {}).get('train')}` ({meta.get('source')})",
             f"model {model.get('name')}, dim {emb.get('dim')}, {tr.get('epochs')} epoch(s), batch {tr.get('batch_size')}"
             + (f", max_steps {tr['max_steps']}" if tr.get("max_steps") else "")]
    if full is not None:
        parts.append(f"full tables {full['embedding_bytes']:,.0f} bytes, AUC {full['auc']:.4f}")
    if meta.get("planted"):
        parts.append(f"planted model's valid AUC (the best possible) {meta['planted']['valid_auc']:.4f}")
    return "; ".join(parts) + ".\n"


def write_reports(out: Path, pairs: list[tuple], plot=None) -> list[dict]:
    """results.csv and results.md from the finished cells (and pareto.png when `plot` is given)."""
    rows = [cell_row(cell, record) for cell, record in pairs]
    write_csv(out / "results.csv", rows)
    meta_file = out / "sweep.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    summary = summarize(rows)
    text = ("# Memory vs AUC tradeoff\n\n" + sweep_header(meta, summary) + "\n" + markdown_table(summary)
            + "\nΔAUC is against `full` (mean over its seeds); ± is the std over seeds.\n")
    with atomic_file(out / "results.md") as tmp:
        tmp.write_text(text)
    if plot is not None and rows:
        planted = (meta.get("planted") or {}).get("valid_auc")
        plot(summary, out / "pareto.png", planted_auc=planted, title=meta.get("source"))
    return rows
