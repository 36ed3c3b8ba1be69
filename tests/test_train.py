"""End-to-end training: real data in, metrics.json out; determinism; bad input leaves nothing behind."""
import json
import subprocess
import sys

import pytest

from embtables.errors import ConfigError, EmbtablesError
from embtables.pipelines.data.ingest_synth import ingest as ingest_synth
from embtables.pipelines.train.local import train
from tests.helpers import tiny_config

CONTRACT_KEYS = {"auc", "logloss", "embedding_bytes", "full_embedding_bytes", "compression_ratio",
                 "samples_per_sec", "train_rows_seen", "valid_rows", "method"}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return ingest_synth(tmp_path_factory.mktemp("data") / "synth", preset="tiny", rows=6000, seed=1)


def config(tmp_path, data, *overrides):
    return tiny_config(tmp_path, data, *overrides, epochs=2)


def test_train_writes_contract_metrics_and_learns(tmp_path, synth):
    metrics = train(config(tmp_path, synth), tmp_path / "run", progress=False)
    assert CONTRACT_KEYS <= set(metrics)
    on_disk = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert on_disk["auc"] == pytest.approx(metrics["auc"])
    stats = json.loads((synth / "stats.json").read_text())
    assert metrics["train_rows_seen"] == 2 * stats["splits"]["train"]["rows"]
    assert metrics["valid_rows"] == stats["splits"]["valid"]["rows"]
    assert metrics["compression_ratio"] == pytest.approx(1.0)
    # Learns something real, and cannot beat the planted model's best possible AUC by much.
    assert 0.6 < metrics["auc"] < metrics["planted"]["valid_auc"] + 0.02
    assert (tmp_path / "run" / "checkpoints").is_dir()
    # `embtables eval` on the run reproduces the final AUC from the checkpoint.
    out = subprocess.run([sys.executable, "-m", "embtables.pipelines.cli.main", "eval", str(tmp_path / "run")],
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1])["auc"] == pytest.approx(metrics["auc"], abs=1e-6)


@pytest.mark.parametrize("backend", ["torch", "fbgemm"])
def test_same_seed_same_result(tmp_path, synth, backend):
    runs = [train(config(tmp_path, synth, f"embedding.backend={backend}", "train.epochs=1"),
                  tmp_path / f"run{i}", progress=False) for i in range(2)]
    assert runs[0]["auc"] == runs[1]["auc"] and runs[0]["logloss"] == runs[1]["logloss"]
    other = train(config(tmp_path, synth, f"embedding.backend={backend}", "train.epochs=1", "train.seed=5"),
                  tmp_path / "run_other", progress=False)
    assert other["auc"] != runs[0]["auc"]


def test_bad_inputs_leave_no_run_dir(tmp_path, synth):
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        train(config(tmp_path, synth, "train.epoch=3"), tmp_path / "a", progress=False)
    with pytest.raises(ConfigError, match=r"data\.sparse.*nope"):
        train(config(tmp_path, synth, "data.sparse=[nope]"), tmp_path / "b", progress=False)
    with pytest.raises(EmbtablesError):
        train(config(tmp_path, tmp_path / "missing"), tmp_path / "c", progress=False)
    assert not any((tmp_path / d).exists() for d in "abc")


def test_refuses_to_overwrite_a_run(tmp_path, synth):
    cfg = config(tmp_path, synth, "train.max_steps=2")
    train(cfg, tmp_path / "run", progress=False)
    with pytest.raises(EmbtablesError, match="not empty"):
        train(cfg, tmp_path / "run", progress=False)


def test_cli_reports_errors_without_traceback(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {train: x}\nmodel: {nmae: dlrm}\n")
    proc = subprocess.run([sys.executable, "-m", "embtables.pipelines.cli.main", "train", str(cfg), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "did you mean 'name'" in proc.stderr and "Traceback" not in proc.stderr
