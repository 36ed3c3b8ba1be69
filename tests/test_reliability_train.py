"""Issue 14, training side: what a careless or hostile user does to a run ends in one `error:` line
(exit 2) or in the previous / the complete new state, never in a traceback, lost data or a run
that silently mixes two trainings."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from embtables.errors import EmbtablesError
from embtables.pipelines.cli.main import main
from embtables.pipelines.data.ingest_synth import ingest as ingest_synth
from embtables.pipelines.train import checkpoint as ckpt_mod
from embtables.pipelines.train.checkpoint import (KEEP, CorruptCheckpoint, checkpoint_dirs, latest_checkpoint,
                                                  load_checkpoint)
from embtables.pipelines.train.local import LocalRun

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "embtables.pipelines.cli.main"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return ingest_synth(tmp_path_factory.mktemp("data") / "synth", preset="tiny", rows=3000, seed=1)


def write_config(tmp_path: Path, data: Path, compression: str = "{method: full}") -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(f"data: {{train: {data}}}\nmodel: {{name: dlrm, bottom_mlp: [8], top_mlp: [16]}}\n"
                    f"embedding: {{dim: 8, backend: torch, compression: {compression}}}\n"
                    "train: {batch_size: 256, epochs: 1, threads: 1, checkpoint_every_steps: 3, prefetch: 0}\n")
    return path


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


def crash_after_saves(monkeypatch, saves: int) -> None:
    """A process that dies right after its `saves`-th checkpoint (what SIGKILL there leaves)."""
    real = LocalRun.save
    count = {"n": 0}

    def save(self, position):
        real(self, position)
        count["n"] += 1
        if count["n"] == saves:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(LocalRun, "save", save)


# --- 5. --resume refuses a changed config -----------------------------------------------------
def test_resume_refuses_changed_defining_keys_names_them_and_allows_safe_ones(tmp_path, synth, capsys, monkeypatch):
    cfg, run = write_config(tmp_path, synth), tmp_path / "run"
    with monkeypatch.context() as m:
        crash_after_saves(m, 2)
        with pytest.raises(KeyboardInterrupt):
            main(["train", str(cfg), "--out", str(run), "--quiet"])
    capsys.readouterr()
    for sets, named in [(["train.seed=5"], "train.seed 0 → 5"),
                        (["train.batch_size=128"], "train.batch_size 256 → 128"),
                        (["embedding.compression.method=hash", "embedding.compression.ratio=4"],
                         "embedding.compression.method 'full' → 'hash'"),
                        (["embedding.dim=4"], "embedding.dim 8 → 4"),
                        (["model.name=dcnv2"], "model.name 'dlrm' → 'dcnv2'")]:
        code, _, err = run_cli(capsys, "train", cfg, "--out", run, "--resume", "--quiet",
                               *[a for s in sets for a in ("--set", s)])
        assert code == 2
        assert named in one_error_line(err) and "may change only" in err
    # A re-ingested dataset at the same path: another fingerprint.
    data2 = tmp_path / "data2"
    shutil.copytree(synth, data2)
    (tmp_path / "2").mkdir()
    cfg2 = write_config(tmp_path / "2", data2)
    run2 = tmp_path / "run2"
    with monkeypatch.context() as m:
        crash_after_saves(m, 1)
        with pytest.raises(KeyboardInterrupt):
            main(["train", str(cfg2), "--out", str(run2), "--quiet"])
    shutil.rmtree(data2)
    ingest_synth(data2, preset="tiny", rows=3000, seed=2)
    capsys.readouterr()
    code, _, err = run_cli(capsys, "train", cfg2, "--out", run2, "--resume", "--quiet")
    assert code == 2 and "dataset" in one_error_line(err) and "fingerprint" in err
    # Safe keys may change: more epochs, other checkpoint cadence and eval batch size.
    code, out, err = run_cli(capsys, "train", cfg, "--out", run, "--resume", "--quiet", "--set", "train.epochs=2",
                             "--set", "train.checkpoint_every_steps=5", "--set", "train.eval_batch_size=999")
    assert code == 0, err
    assert "resuming from step-00000006" in out
    rows = json.loads((synth / "stats.json").read_text())["splits"]["train"]["rows"]
    assert json.loads((run / "metrics.json").read_text())["train_rows_seen"] == 2 * rows


# --- 6. checksummed checkpoints, fallback to the newest intact one ----------------------------
def flip_byte(path: Path, at: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_corrupt_latest_checkpoint_is_refused_and_resume_eval_fall_back_loudly(tmp_path, synth, capsys):
    cfg = write_config(tmp_path, synth)
    code, _, err = run_cli(capsys, "train", cfg, "--out", tmp_path / "whole", "--quiet")
    assert code == 0, err
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    run = tmp_path / "run"
    shutil.copytree(tmp_path / "whole", run)
    found = checkpoint_dirs(run)
    assert len(found) == KEEP  # one rotation: only the newest KEEP checkpoints stay
    older, newest = found
    assert set(json.loads((newest / "digests.json").read_text())) == {"state.pt"}
    flip_byte(newest / "state.pt")  # one bit: torch would load it, silently worse
    with pytest.raises(CorruptCheckpoint, match="sha256"):
        load_checkpoint(newest)
    assert latest_checkpoint(run) == older
    warning = capsys.readouterr().err
    assert newest.name in warning and older.name in warning and warning.startswith("warning:")
    # eval falls back (loudly) and scores the older checkpoint.
    code, out, err = run_cli(capsys, "eval", run)
    assert code == 0 and f"falling back to {older}" in err
    # --resume continues from the older one and ends bit-identical to the uninterrupted run.
    code, out, err = run_cli(capsys, "train", cfg, "--out", run, "--resume", "--quiet")
    assert code == 0, err
    assert f"resuming from {older.name}" in out
    assert json.loads((run / "metrics.json").read_text())["auc"] == whole["auc"]
    # Truncated, then every checkpoint bad: one error line, no traceback.
    for ckpt in checkpoint_dirs(run):
        with open(ckpt / "state.pt", "r+b") as f:
            f.truncate(100)
    code, _, err = run_cli(capsys, "eval", run)
    assert code == 2 and "no intact checkpoint" in one_error_line(err)


# --- 8. OptEmbed killed in its supernet stage resumes exactly --------------------------------
OPTEMBED = "{method: optembed, ratio: 3, iterations: 2, population: 6, mutations: 3, crossovers: 3, keep: 4}"


def test_optembed_killed_in_supernet_resumes_bit_identical(tmp_path, synth, monkeypatch, capsys):
    cfg = write_config(tmp_path, synth, OPTEMBED)
    assert main(["train", str(cfg), "--out", str(tmp_path / "whole"), "--quiet"]) == 0
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        crash_after_saves(m, 2)  # mid-epoch of the supernet (its sampled dims draw from the RNG)
        with pytest.raises(KeyboardInterrupt):
            main(["train", str(cfg), "--out", str(run), "--quiet"])
    assert checkpoint_dirs(run / "supernet") and not (run / "supernet" / "metrics.json").exists()
    capsys.readouterr()
    assert main(["train", str(cfg), "--out", str(run), "--resume", "--quiet"]) == 0
    assert "resuming from step-00000006" in capsys.readouterr().out
    resumed = json.loads((run / "metrics.json").read_text())
    assert resumed["optembed"]["stage_auc"] == whole["optembed"]["stage_auc"]
    assert resumed["auc"] == whole["auc"] and resumed["train_rows_seen"] == whole["train_rows_seen"]


# --- 9. disk full / not a directory: one error line, no partial checkpoint left ----------------
def test_disk_full_mid_training_is_one_error_line_and_leaves_a_resumable_run(tmp_path, synth, capsys, monkeypatch):
    cfg, run = write_config(tmp_path, synth), tmp_path / "run"
    real, calls = torch.save, {"n": 0}

    def full_disk(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint: the disk filled up meanwhile
            f.write(b"x" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    code, _, err = run_cli(capsys, "train", cfg, "--out", run, "--quiet")
    line = one_error_line(err)
    assert code == 2 and "No space left on device" in line and ".tmp-step-00000006" in line
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000003"]  # no partial one
    monkeypatch.setattr(torch, "save", real)
    code, out, err = run_cli(capsys, "train", cfg, "--out", run, "--resume", "--quiet")
    assert code == 0 and "resuming from step-00000003" in out, err


def test_out_paths_that_cannot_be_dirs_fail_before_any_work(tmp_path, synth, capsys):
    cfg = write_config(tmp_path, synth)
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    code, _, err = run_cli(capsys, "train", cfg, "--out", a_file, "--quiet")
    assert code == 2 and "is a file, not a directory" in one_error_line(err)
    code, _, err = run_cli(capsys, "train", cfg, "--out", a_file / "run", "--quiet")
    assert code == 2 and str(a_file) in one_error_line(err)
    assert a_file.read_text() == "keep me"


def test_cli_turns_os_errors_into_one_line_naming_the_path(capsys, monkeypatch):
    import embtables.pipelines.cli.main as cli

    for err in (OSError(errno.EACCES, "Permission denied", "/r/x"), OSError(errno.EROFS, "Read-only file system",
                "/r/y"), OSError(errno.EXDEV, "Invalid cross-device link", "/a", "/b")):
        def boom(args, err=err):
            raise err
        monkeypatch.setattr(cli, "cmd_eval", boom)
        assert cli.main(["eval", "somewhere"]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert err.filename in line and err.strerror in line


# --- NaN loss ---------------------------------------------------------------------------------
def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, synth, capsys, monkeypatch):
    cfg, run = write_config(tmp_path, synth), tmp_path / "run"
    real, steps = LocalRun.loss, {"n": 0}

    def loss(self, logits, batch):
        steps["n"] += 1
        value = real(self, logits, batch)
        return value * float("nan") if steps["n"] == 5 else value

    monkeypatch.setattr(LocalRun, "loss", loss)
    code, _, err = run_cli(capsys, "train", cfg, "--out", run, "--quiet")
    assert code == 2 and "loss is nan at step 5" in one_error_line(err)
    assert [p.name for p in checkpoint_dirs(run)] == ["step-00000003"]
    state = load_checkpoint(latest_checkpoint(run))
    assert all(torch.isfinite(v).all() for v in state["tables"].values())


class _InfGradient(torch.autograd.Function):
    """Adds 0 to the loss; sends an infinite gradient into x (an update that overflows)."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return x.new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        return torch.full(ctx.shape, float("inf"))


@pytest.mark.parametrize("where", ["dense", "tables"])
def test_finite_loss_with_non_finite_weights_stops_before_the_checkpoint(tmp_path, synth, capsys, monkeypatch,
                                                                          where):
    """Step 6's loss is finite but its update makes the dense weights (or the table rows, whose
    row-wise Adagrad runs inside backward) non-finite: the step-6 checkpoint is not written."""
    cfg, run = write_config(tmp_path, synth), tmp_path / "run"
    real, steps = LocalRun.loss, {"n": 0}

    def loss(self, logits, batch):
        steps["n"] += 1
        value = real(self, logits, batch)
        if steps["n"] != 6:
            return value
        x = (next(self.model.network.parameters()) if where == "dense"
             else self.model.embeddings(batch.sparse))
        return value + _InfGradient.apply(x)

    monkeypatch.setattr(LocalRun, "loss", loss)
    code, _, err = run_cli(capsys, "train", cfg, "--out", run, "--quiet")
    assert code == 2 and "weights are not finite after step 6" in one_error_line(err)
    assert [p.name for p in checkpoint_dirs(run)] == ["step-00000003"]
    state = load_checkpoint(latest_checkpoint(run))
    assert all(torch.isfinite(v).all() for v in [*state["tables"].values(), *state["dense"].values()])


# --- 12. run-dir lock ---------------------------------------------------------------------
HOLD_LOCK = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
             "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode()); print('held', flush=True); "
             "time.sleep(600)")


def test_run_dir_lock_refuses_a_second_writer_and_a_dead_holder_does_not_block(tmp_path, synth, capsys, monkeypatch):
    cfg, run = write_config(tmp_path, synth), tmp_path / "run"
    with monkeypatch.context() as m:
        crash_after_saves(m, 1)
        with pytest.raises(KeyboardInterrupt):
            main(["train", str(cfg), "--out", str(run), "--quiet"])
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run / "run.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        code, _, err = run_cli(capsys, "train", cfg, "--out", run, "--resume", "--quiet")
        assert code == 2 and f"in use by another training (pid {holder.pid})" in one_error_line(err)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The holder died without unlocking; its lock file and a killed write's temporaries remain.
    stale = run / "checkpoints" / ".tmp-step-00000099-999999"
    stale.mkdir()
    (stale / "state.pt").write_bytes(b"partial")
    code, out, err = run_cli(capsys, "train", cfg, "--out", run, "--resume", "--quiet")
    assert code == 0 and "resuming from step-00000003" in out, err
    assert not stale.exists()


def test_eval_and_export_remove_a_dead_process_temporaries_but_not_a_live_training(tmp_path, synth, capsys):
    cfg, run = write_config(tmp_path, synth), tmp_path / "run"
    assert run_cli(capsys, "train", cfg, "--out", run, "--quiet")[0] == 0

    def plant() -> list[Path]:
        ckpt = run / "checkpoints" / ".tmp-step-00000099-999999"  # a killed training's half checkpoint
        ckpt.mkdir(exist_ok=True)
        (ckpt / "state.pt").write_bytes(b"partial")
        json_tmp = run / ".metrics.json.tmp-999999-0123abcd"
        json_tmp.write_text("{")
        return [ckpt, json_tmp]

    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run / "run.lock")], stdout=subprocess.PIPE, text=True)
    try:  # a training holds the run: its temporaries are live, so eval leaves them
        assert holder.stdout.readline().strip() == "held"
        stale = plant()
        assert run_cli(capsys, "eval", run)[0] == 0
        assert all(p.exists() for p in stale)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert run_cli(capsys, "eval", run)[0] == 0
    assert not any(p.exists() for p in stale)
    stale = plant()
    assert run_cli(capsys, "export", run, "--out", tmp_path / "exp")[0] == 0
    assert not any(p.exists() for p in stale)


# --- SIGKILL of a real single-process training --------------------------------------------
def wait_for(cond, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        assert proc.poll() is None, f"training ended ({proc.returncode}) too early"
        time.sleep(0.05)
    raise AssertionError("timed out")


@pytest.mark.slow  # two real CLI processes and a third uninterrupted run: ~30 s on 2 cores
def test_sigkill_mid_epoch_then_resume_is_bit_identical_and_the_lock_holds_meanwhile(tmp_path, synth, capsys):
    cfg, run = write_config(tmp_path, synth), tmp_path / "run"
    cmd = CLI + ["train", str(cfg), "--out", str(run), "--quiet", "--set", "train.epochs=3",
                 "--set", "train.checkpoint_every_steps=1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(checkpoint_dirs(run)) >= 2, proc)
        # Frozen wherever it is (a step or a checkpoint write), so it cannot finish the run while
        # the second writer is refused: the kill then lands mid-run on any machine speed.
        proc.send_signal(signal.SIGSTOP)
        code, _, err = run_cli(capsys, "train", cfg, "--out", run, "--resume", "--quiet", "--set", "train.epochs=3")
        assert code == 2 and "in use by another training" in one_error_line(err)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    assert not (run / "metrics.json").exists()
    code, out, err = run_cli(capsys, "train", cfg, "--out", run, "--resume", "--quiet", "--set", "train.epochs=3",
                             "--set", "train.checkpoint_every_steps=1")
    assert code == 0 and "resuming from step-" in out, err
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert main(["train", str(cfg), "--out", str(tmp_path / "whole"), "--quiet", "--set", "train.epochs=3",
                 "--set", "train.checkpoint_every_steps=1"]) == 0
    resumed = json.loads((run / "metrics.json").read_text())
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert resumed["auc"] == whole["auc"] and resumed["train_rows_seen"] == whole["train_rows_seen"]


def test_duplicate_parquet_column_name_is_one_error_line(tmp_path, capsys):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 100
    columns = [pa.array(np.arange(n) % 2, pa.float32()), pa.array(np.arange(n) % 5), pa.array(np.arange(n) % 7),
               pa.array(np.linspace(0, 1, n))]
    pq.write_table(pa.Table.from_arrays(columns, names=["label", "C1", "C1", "I1"]), tmp_path / "d.parquet")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{train: {tmp_path / 'd.parquet'}, sparse: [C1], dense: [I1]}}\n")
    code, _, err = run_cli(capsys, "train", cfg, "--out", tmp_path / "run", "--quiet")
    assert code == 2 and "'C1' appear more than once" in one_error_line(err)
    assert not (tmp_path / "run").exists()
