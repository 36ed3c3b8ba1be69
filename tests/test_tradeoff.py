"""`embtables bench tradeoff`: a tiny sweep end to end, unreachable ratios recorded, killed sweeps resume."""
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from embtables.config import load_config
from embtables.errors import ConfigError, EmbtablesError
from embtables.methods import REGISTRY
from embtables.methods.full import Full
from embtables.pipelines.bench import tradeoff
from embtables.pipelines.data.ingest_synth import ingest as ingest_synth
from embtables.pipelines.bench.tradeoff import run_tradeoff

CONFIG = ("model: {{name: dlrm, bottom_mlp: [8], top_mlp: [16]}}\n"
          "embedding: {{dim: 8, backend: torch}}\n"
          "train: {{batch_size: 256, epochs: 1, max_steps: 3, threads: 1, eval_batch_size: 4096}}\n"
          "data: {{train: {data}}}\n")


class Unreachable(Full):
    """A method whose solve always says the ratio is out of its reach (as real solves do)."""
    name = "unreach"

    @classmethod
    def solve_group(cls, features, dim, ratio, **options):
        raise ConfigError(f"compression ratio {ratio:g} is out of reach for method 'unreach'")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return ingest_synth(tmp_path_factory.mktemp("data") / "synth", preset="tiny", rows=3000, seed=3)


@pytest.fixture
def config_file(tmp_path, synth):
    path = tmp_path / "cfg.yaml"
    path.write_text(CONFIG.format(data=synth))
    return path


@pytest.fixture
def unreach(monkeypatch):
    monkeypatch.setitem(REGISTRY, "unreach", f"{__name__}:Unreachable")


def read_rows(out):
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_tiny_sweep_writes_csv_table_and_plot(tmp_path, config_file, synth, unreach, monkeypatch):
    out = tmp_path / "sweep"
    run_tradeoff(load_config(config_file), out, methods=["hash", "unreach"], ratios=[10], seeds=2)

    rows = read_rows(out)
    # full once per seed at ratio 1 (the reference), every other method at every ratio.
    cells = sorted((r["method"], float(r["ratio"]), int(r["seed"])) for r in rows)
    assert cells == sorted([("full", 1.0, s) for s in (0, 1)] + [(m, 10.0, s) for m in ("hash", "unreach")
                                                                   for s in (0, 1)])
    by_cell = {(r["method"], float(r["ratio"]), int(r["seed"])): r for r in rows}
    stats = json.loads((synth / "stats.json").read_text())
    for s in (0, 1):
        full, hashed = by_cell["full", 1.0, s], by_cell["hash", 10.0, s]
        assert full["status"] == "ok" and float(full["achieved_ratio"]) == pytest.approx(1.0)
        assert 0 < float(full["auc"]) < 1 and float(full["samples_per_sec"]) > 0
        assert float(full["planted_auc"]) == pytest.approx(stats["planted"]["valid_auc"])
        # achieved ratio and bytes agree with the full reference's bytes
        assert float(hashed["achieved_ratio"]) == pytest.approx(
            float(full["embedding_bytes"]) / float(hashed["embedding_bytes"]))
        assert by_cell["unreach", 10.0, s]["status"] == "unreachable"
        assert "out of reach" in by_cell["unreach", 10.0, s]["note"]
    # Seeds are real: the two full runs differ, and every cell kept its own run dir.
    assert by_cell["full", 1.0, 0]["auc"] != by_cell["full", 1.0, 1]["auc"]
    assert (out / "runs" / "hash-r10-s1" / "metrics.json").is_file()
    assert (out / "runs" / "unreach-r10-s0" / "unreachable.json").is_file()

    table = (out / "results.md").read_text()
    full_aucs = [float(by_cell["full", 1.0, s]["auc"]) for s in (0, 1)]
    mean, std = sum(full_aucs) / 2, abs(full_aucs[0] - full_aucs[1]) / math.sqrt(2)
    assert "| full | 1 | 1.0× |" in table and f"{mean:.4f} ± {std:.4f}" in table
    assert "unreachable [1]" in table and "[1] unreach at 10×" in table
    assert "planted model's valid AUC" in table
    png = (out / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    # Reach is re-checked on every run: once the method can meet the ratio, its cells get trained.
    monkeypatch.setitem(REGISTRY, "unreach", "embtables.methods.full:Full")
    run_tradeoff(load_config(config_file), out, methods=["hash", "unreach"], ratios=[10], seeds=2)
    assert {r["status"] for r in read_rows(out)} == {"ok"}
    assert not (out / "runs" / "unreach-r10-s0" / "unreachable.json").exists()


def test_killed_sweep_resumes_without_rerunning_finished_cells(tmp_path, config_file, monkeypatch):
    out = tmp_path / "sweep"
    real_train = tradeoff.train
    calls = []

    def dies_in_second_cell(cfg, cell_dir, **kw):
        calls.append(cell_dir.name)
        if len(calls) == 2:  # killed mid-training: a partial run dir, no metrics.json
            cell_dir.mkdir(parents=True)
            (cell_dir / "run.json").write_text("{}")
            raise KeyboardInterrupt
        return real_train(cfg, cell_dir, **kw)

    monkeypatch.setattr(tradeoff, "train", dies_in_second_cell)
    cfg = load_config(config_file)
    with pytest.raises(KeyboardInterrupt):
        run_tradeoff(cfg, out, methods=["hash"], ratios=[1, 10], seeds=1)
    assert calls == ["full-r1-s0", "hash-r1-s0"]
    first = out / "runs" / "full-r1-s0" / "metrics.json"
    first_state = (first.stat().st_mtime_ns, first.read_text())
    assert [r["method"] for r in read_rows(out)] == ["full"]  # the CSV holds what finished

    calls.clear()
    monkeypatch.setattr(tradeoff, "train", lambda cfg, d, **kw: (calls.append(d.name), real_train(cfg, d, **kw))[1])
    run_tradeoff(cfg, out, methods=["hash"], ratios=[1, 10], seeds=1)
    assert calls == ["hash-r1-s0", "hash-r10-s0"]  # the finished cell was not re-run
    assert (first.stat().st_mtime_ns, first.read_text()) == first_state
    assert {r["method"] + r["ratio"] for r in read_rows(out)} == {"full1.0", "hash1.0", "hash10.0"}

    # Once everything is finished, running again trains nothing.
    calls.clear()
    run_tradeoff(cfg, out, methods=["hash"], ratios=[1, 10], seeds=1)
    assert calls == []


def test_sigkilled_sweep_resumes(tmp_path, config_file):
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "embtables.pipelines.cli.main", "bench", "tradeoff", str(config_file), "--methods", "hash",
           "--ratios", "1,10", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    first = out / "runs" / "full-r1-s0" / "metrics.json"
    deadline = time.monotonic() + 180  # generous: the machine may be busy
    while not first.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None  # killed mid-sweep: two cells still to go
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first.is_file()
    first_state = (first.stat().st_mtime_ns, first.read_text())

    run_tradeoff(load_config(config_file), out, methods=["hash"], ratios=[1, 10], seeds=1)
    assert (first.stat().st_mtime_ns, first.read_text()) == first_state
    assert len(read_rows(out)) == 3 and (out / "pareto.png").is_file()


def test_resume_refuses_a_different_config_and_unknown_methods(tmp_path, config_file):
    out = tmp_path / "sweep"
    cfg = load_config(config_file)
    with pytest.raises(ConfigError, match="unknown compression method 'nope'"):
        run_tradeoff(cfg, out, methods=["nope"], ratios=[10])
    assert not out.exists()  # nothing written before the inputs are checked
    run_tradeoff(cfg, out, methods=[], ratios=[10])
    other = load_config(config_file, ["embedding.dim=4"])
    with pytest.raises(EmbtablesError, match="differs at embedding.dim"):
        run_tradeoff(other, out, methods=[], ratios=[10])


def test_bench_cli_parses_lists_and_runs_lazy_benches(tmp_path, monkeypatch):
    import types

    from embtables.pipelines.cli.main import build_parser
    from embtables.pipelines.cli import bench as bench_cli

    args = build_parser().parse_args(["bench", "tradeoff", "cfg.yaml", "--methods", "full, hash,qr",
                                      "--ratios", "1,10,1e3", "--out", "d", "--seeds", "3"])
    assert (args.methods, args.ratios, args.seeds) == (["full", "hash", "qr"], [1.0, 10.0, 1000.0], 3)

    monkeypatch.setitem(bench_cli.EXTERNAL, "kernels", ("embtables.pipelines.no_such_bench", "add", "run", ""))
    with pytest.raises(EmbtablesError, match="bench kernels. is not available"):
        bench_cli._external_runner("kernels")(types.SimpleNamespace(json=None))
    fake = types.ModuleType("fake_bench")
    fake.run = lambda args: {"samples_per_sec": 123.0}
    monkeypatch.setitem(sys.modules, "fake_bench", fake)
    monkeypatch.setitem(bench_cli.EXTERNAL, "kernels", ("fake_bench", "add", "run", ""))
    bench_cli._external_runner("kernels")(types.SimpleNamespace(json=str(tmp_path / "k.json")))
    assert json.loads((tmp_path / "k.json").read_text()) == {"samples_per_sec": 123.0}


@pytest.mark.slow  # starts a Ray cluster: ~30 s on 2 cores; run by `make test-slow` and CI
def test_cells_run_as_ray_tasks_give_the_same_results(tmp_path, config_file, monkeypatch):
    """With a Ray cluster up, cells run as Ray tasks (fractional CPUs) and train exactly as in-process."""
    import ray

    cfg = load_config(config_file)
    here = run_tradeoff(cfg, tmp_path / "here", methods=["hash"], ratios=[10])
    monkeypatch.setattr(tradeoff, "_run_here", lambda *a: pytest.fail("a cell ran in-process"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        on_ray = run_tradeoff(cfg, tmp_path / "ray", methods=["hash"], ratios=[10], cell_cpus=0.5)
    finally:
        ray.shutdown()
    assert [r["method"] for r in on_ray] == [r["method"] for r in here] == ["full", "hash"]
    for a, b in zip(here, on_ray):
        assert a["status"] == b["status"] == "ok"
        assert float(a["auc"]) == pytest.approx(float(b["auc"]), abs=1e-6)
    assert (tmp_path / "ray" / "pareto.png").stat().st_size > 0
