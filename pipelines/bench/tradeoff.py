"""`embtables bench tradeoff`: every method × ratio × seed trained on the same data and model.

One cell = one `train(cfg, out)` run in DIR/runs/<method>-r<ratio>-s<seed>/. A cell is finished
when its metrics.json exists; finished cells are never re-run, so a killed sweep resumes where it
stopped. An unfinished cell dir (killed mid-training) is removed and the cell trained again. A
cell whose method cannot reach its ratio (the solve says so) gets an unreachable.json instead;
that check is cheap and is repeated on every run, so a method improved since then gets trained.
`full` always runs once per seed at ratio 1: it is the reference every figure is measured against.
"""
from __future__ import annotations

import copy
import json
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from embtables.errors import EmbtablesError
from embtables.pipelines.train.checkpoint import write_json_atomic
from embtables.pipelines.train.local import train
from embtables.pipelines.bench.tradeoff_report import cell_row, write_reports

REFERENCE = "full"
UNREACHABLE_FILE = "unreachable.json"
# Methods `train` builds stage by stage (their model does not exist before training starts), so
# their budget cannot be probed up front; their metrics.json says whether it was met.
STAGED = {"optembed"}
# Config parts each cell sets itself; the rest must match across resumes of one sweep dir.
CELL_KEYS = (("embedding", "compression"), ("train", "seed"), ("train", "threads"))


@dataclass(frozen=True)
class Cell:
    method: str
    ratio: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}-r{self.ratio:g}-s{self.seed}"


def plan_cells(methods: list[str], ratios: list[float], seeds: list[int]) -> list[Cell]:
    """The sweep grid, seed-major so a partial sweep already covers every method once."""
    methods = [REFERENCE] + [m for m in dict.fromkeys(methods) if m != REFERENCE]
    cells = []
    for seed in seeds:
        for method in methods:
            for ratio in ([1.0] if method == REFERENCE else sorted(set(ratios))):
                cells.append(Cell(method, float(ratio), seed))
    return cells


def check_methods(methods: list[str]) -> None:
    """Fail before any training if a method is unknown or its module does not import."""
    from embtables.methods import method_class

    for name in methods:
        try:
            method_class(name)  # ConfigError naming the known methods
        except ImportError as e:
            raise EmbtablesError(f"--methods: method {name!r} is not available in this build ({e})") from None


def cell_config(base: dict, cell: Cell, threads: int | None) -> dict:
    cfg = copy.deepcopy(base)
    cfg["embedding"]["compression"] = {"method": cell.method, "ratio": cell.ratio}
    cfg["train"]["seed"] = cell.seed
    if threads is not None:
        cfg["train"]["threads"] = threads
    return cfg


def unreachable_reason(cfg: dict) -> str | None:
    """The solve's own message when this method cannot meet this ratio here, else None."""
    from embtables.methods.build import build_methods
    from embtables.pipelines.train.build import resolve_inputs

    if cfg["embedding"]["compression"]["method"] in STAGED:
        return None
    inputs = resolve_inputs(cfg)
    try:
        build_methods(inputs.features, cfg["embedding"])
    except (EmbtablesError, ValueError) as e:
        return str(e)
    return None


def run_cell(cfg: dict, cell_dir: str | Path) -> dict:
    """Train one cell unless it is finished; returns its metrics (or its unreachable record)."""
    cell_dir = Path(cell_dir)
    done = finished_record(cell_dir)
    if done is not None and done["status"] == "ok":
        return done
    if cell_dir.exists():
        shutil.rmtree(cell_dir)  # killed mid-run (partial state not worth trusting), or to re-check reach
    reason = unreachable_reason(cfg)
    if reason is not None:
        cell_dir.mkdir(parents=True)
        record = {"status": "unreachable", "reason": reason,
                  "method": cfg["embedding"]["compression"]["method"],
                  "requested_ratio": cfg["embedding"]["compression"]["ratio"]}
        write_json_atomic(cell_dir / UNREACHABLE_FILE, record)
        return record
    return {"status": "ok", **train(cfg, cell_dir, progress=False)}


def finished_record(cell_dir: Path) -> dict | None:
    if (cell_dir / "metrics.json").is_file():
        return {"status": "ok", **json.loads((cell_dir / "metrics.json").read_text())}
    if (cell_dir / UNREACHABLE_FILE).is_file():
        return json.loads((cell_dir / UNREACHABLE_FILE).read_text())
    return None


def prepare_sweep(cfg: dict, out: Path) -> dict:
    """Resolve the dataset once and pin the sweep's config in DIR/sweep.json (checked on resume)."""
    from embtables.pipelines.train.build import resolve_inputs

    inputs = resolve_inputs(cfg)
    base = copy.deepcopy(cfg)
    base["data"].update(train=str(Path(inputs.dataset).resolve()), valid=None)
    base.pop("_config_dir", None)
    pinned = copy.deepcopy(base)
    for section, key in CELL_KEYS:
        pinned[section].pop(key, None)
    sweep_file = out / "sweep.json"
    if sweep_file.is_file():
        before = json.loads(sweep_file.read_text())["config"]
        if _diff(before, pinned):
            raise EmbtablesError(f"{out} holds a sweep run with a different config "
                                 f"(differs at {', '.join(_diff(before, pinned))}); use a new --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(sweep_file, {"config": pinned, "planted": inputs.stats.get("planted"),
                                       "source": inputs.stats.get("source")})
    return base


def _diff(a, b, path: str = "") -> list[str]:
    """Keys whose values differ. Keys only one side has are skipped: a config key added to
    embtables since the sweep began (with its default) must not orphan the finished cells."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) & set(b), key=str):
            out += _diff(a[k], b[k], f"{path}.{k}" if path else str(k))
        return out
    return [] if a == b else [path or "<root>"]


def run_tradeoff(cfg: dict, out: str | Path, methods: list[str], ratios: list[float], seeds: int = 1,
                 address: str | None = None, cell_cpus: float = 1.0, report_only: bool = False) -> list[dict]:
    """Run (or resume) the sweep and write results.csv, results.md and pareto.png; returns the rows."""
    from embtables.pipelines.bench.pareto_plot import plot_pareto

    out = Path(out)
    if not ratios or any(r < 1 for r in ratios):
        raise EmbtablesError(f"--ratios must be numbers >= 1, got {ratios}")
    if seeds < 1:
        raise EmbtablesError(f"--seeds must be >= 1, got {seeds}")
    check_methods(methods)
    base = prepare_sweep(cfg, out)
    first_seed = base["train"]["seed"]
    cells = plan_cells(methods, ratios, list(range(first_seed, first_seed + seeds)))
    records: dict[Cell, dict] = {}
    for cell in cells:
        done = finished_record(out / "runs" / cell.name)
        if done is not None:
            records[cell] = done
    todo = [] if report_only else [c for c in cells if records.get(c, {}).get("status") != "ok"]
    trained = sum(r["status"] == "ok" for r in records.values())
    print(f"tradeoff sweep: {len(cells)} cells, {trained} trained, {len(todo)} to run or re-check → {out}")

    failed: dict[Cell, dict] = {}  # reported, never persisted: the next run retries them

    def pairs() -> list[tuple]:
        return [(c, failed.get(c) or records[c]) for c in cells if c in records or c in failed]

    def finish(cell: Cell, record: dict | None, error: BaseException | None) -> None:
        if error is not None:
            failed[cell] = {"status": "failed", "reason": f"{type(error).__name__}: {error}"}
            print(f"  {cell.name}: FAILED ({failed[cell]['reason']}); re-run the sweep to retry")
            write_reports(out, pairs(), plot=None)
            return
        records[cell] = record
        row = cell_row(cell, record)
        what = (f"AUC {row['auc']:.4f}, {row['achieved_ratio']:.1f}x, {row['train_seconds']:.0f}s"
                if row["status"] == "ok" else "unreachable")
        print(f"  [{len(records)}/{len(cells)}] {cell.name}: {what}")
        write_reports(out, pairs(), plot=None)

    if address is not None or _ray_ready():
        _run_on_ray(todo, base, out, address, cell_cpus, finish)
    else:
        for cell in todo:
            _run_here(cell, base, out, finish)
    rows = write_reports(out, pairs(), plot=plot_pareto)
    if failed:
        raise EmbtablesError(f"{len(failed)} cell(s) failed (finished cells are kept; re-run to retry):\n  "
                             + "\n  ".join(f"{c.name}: {r['reason']}" for c, r in failed.items()))
    return rows


def _run_here(cell: Cell, base: dict, out: Path, finish) -> None:
    tick = time.perf_counter()
    print(f"cell {cell.name} …", flush=True)
    try:
        record = run_cell(cell_config(base, cell, None), out / "runs" / cell.name)
    except Exception as e:  # noqa: BLE001 — one broken method must not cost the rest of a long sweep
        traceback.print_exc()
        finish(cell, None, e)
        return
    record.setdefault("wall_seconds", time.perf_counter() - tick)
    finish(cell, record, None)


def _ray_ready() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def _run_on_ray(todo: list[Cell], base: dict, out: Path, address: str | None, cell_cpus: float, finish) -> None:
    """Cells as Ray tasks of `cell_cpus` CPUs each; DIR must be on a filesystem every node sees."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    threads = max(1, int(cell_cpus))
    task = ray.remote(num_cpus=cell_cpus)(run_cell)
    pending = {task.remote(cell_config(base, c, threads), str(out / "runs" / c.name)): c for c in todo}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        cell = pending.pop(ready[0])
        try:
            finish(cell, ray.get(ready[0]), None)
        except ray.exceptions.RayError as e:  # the task raised, or its worker died
            finish(cell, None, e)
