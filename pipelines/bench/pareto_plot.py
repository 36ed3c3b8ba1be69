"""The memory/AUC Pareto plot of a tradeoff sweep: AUC vs embedding bytes (log x), one line per method."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only: no display on servers and in tests
import matplotlib.pyplot as plt  # noqa: E402

from embtables.atomic import atomic_file  # noqa: E402

# The two baselines are drawn so they stand out from the methods compared against them.
STYLES = {
    "full": dict(color="black", marker="*", markersize=16, linestyle="none", zorder=5),
    "hash": dict(color="black", marker="x", markersize=8, linestyle="--", linewidth=2, zorder=4),
}


def plot_pareto(summary: list[dict], path: str | Path, planted_auc: float | None = None,
                title: str | None = None) -> None:
    """Write the plot to `path` (atomically). `summary` is tradeoff_report.summarize's output."""
    path = Path(path)
    fig, ax = plt.subplots(figsize=(10, 5.5))
    ok = [e for e in summary if e["status"] == "ok" and not math.isnan(e["auc"])]
    full = next((e for e in ok if e["method"] == "full"), None)
    for method in dict.fromkeys(e["method"] for e in ok):
        points = sorted((e for e in ok if e["method"] == method), key=lambda e: e["embedding_bytes"])
        style = STYLES.get(method, dict(marker="o", markersize=5, linestyle="-"))
        ax.errorbar([e["embedding_bytes"] for e in points], [e["auc"] for e in points],
                    yerr=[e["auc_std"] for e in points], label=method, capsize=2, **style)
        if method == "hash":  # the ratio each baseline point was asked for, to read the x axis by
            for e in points:
                ax.annotate(f"{e['ratio']:g}×", (e["embedding_bytes"], e["auc"]), textcoords="offset points",
                            xytext=(4, -12), fontsize=7)
    if full is not None:
        ax.axhline(full["auc"], color="black", linestyle=":", linewidth=1)
    if planted_auc is not None:
        ax.axhline(planted_auc, color="tab:red", linestyle="-.", linewidth=1.2,
                   label=f"planted model (best possible) {planted_auc:.4f}")
    ax.set_xscale("log")
    ax.set_xlabel("embedding bytes (log)")
    ax.set_ylabel("validation AUC")
    if full is not None:  # a top axis in compression ratio, read off the same positions
        total = full["embedding_bytes"]
        def flip(x):  # bytes ↔ ratio; matplotlib also probes 0, which maps to "infinite"
            return total / np.maximum(np.asarray(x, dtype=float), 1e-300)

        top = ax.secondary_xaxis("top", functions=(flip, flip))
        top.set_xlabel("compression ratio vs full (×)")
    ax.set_title(f"Memory vs AUC{f' — {title}' if title else ''}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
