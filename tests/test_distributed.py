"""Distributed training: sharded lookup = unsharded one, and the Ray Train job end to end
(2 CPU workers): plan over both ranks, AUC of one process, SIGKILL + --resume and a killed
worker (max_failures) both ending with every row seen exactly `epochs` times. Every Ray
process the tests start is gone at the end.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import end_spawned_rank, free_port

from embtables.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "embtables.pipelines.cli.main"]
AUC_TOLERANCE = 0.02  # 2k validation rows; the 400k-row benchmark holds 0.005


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    from embtables.pipelines.data.ingest_synth import ingest

    out = tmp_path_factory.mktemp("dist") / "synth"
    ingest(out, preset="tiny", rows=20_000, seed=3)
    return out


@pytest.fixture(scope="module")
def synth_multi_hot(tmp_path_factory) -> Path:
    """Multi-hot bags, where a mean combiner differs from a sum."""
    from embtables.pipelines.data.ingest_synth import ingest

    out = tmp_path_factory.mktemp("dist") / "synth-mh"
    ingest(out, preset="tiny", rows=4_000, multi_hot=1, seed=3)
    return out


def overrides(data: Path, **extra) -> list[str]:
    base = {"data.train": str(data), "train.batch_size": 512, "train.epochs": 2, "train.seed": 0,
            "model.name": "dlrm", "model.bottom_mlp": "[32]", "model.top_mlp": "[64]", "train.threads": 1}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def single_process_auc(data: Path, out: Path, **extra) -> float:
    from embtables.pipelines.train.local import train

    return train(load_config(None, overrides(data, **extra)), out, progress=False)["auc"]


# --- processes ---------------------------------------------------------------------------
def session_pids(sid: int) -> list[int]:
    """Live processes of session `sid` (the CLI we started and every Ray process under it)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def kill_session(sid: int) -> None:
    for pid in session_pids(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def launch(data: Path, out: Path, *args: str, **extra) -> subprocess.Popen:
    cmd = CLI + ["train", str(ROOT / "configs" / "demo.yaml"), "--out", str(out), "--quiet", *args]
    for o in overrides(data, **extra):
        cmd += ["--set", o]
    log = open(out.parent / f"{out.name}.log", "ab")
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 600) -> None:
    try:
        code = proc.wait(timeout=timeout)
    finally:
        kill_session(proc.pid)
    assert code == 0, f"training exited with {code}"
    deadline = time.time() + 20
    while session_pids(proc.pid) and time.time() < deadline:  # ray.shutdown() stops them
        time.sleep(0.5)
    leftover = session_pids(proc.pid)
    kill_session(proc.pid)
    assert not leftover, f"Ray processes left behind: {leftover}"


def wait_for(cond, proc: subprocess.Popen, timeout: float = 600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (value := cond()):
            return value
        if proc.poll() is not None:
            raise AssertionError(f"training ended (code {proc.returncode}) before the condition held")
        time.sleep(0.2)
    raise AssertionError("timed out")


def mid_epoch_checkpoint(out: Path):
    for ckpt in sorted((out / "checkpoints").glob("step-*")):
        pos = json.loads((ckpt / "position.json").read_text())
        if pos["epoch"] == 0 and pos["rows_in_epoch"] > 0:
            return ckpt
    return None


def train_rows(data: Path) -> int:
    return json.loads((data / "stats.json").read_text())["splits"]["train"]["rows"]


# --- pieces without Ray ------------------------------------------------------------------
def test_arrow_rows_become_the_same_batch_and_consumed_rows_are_skipped(synth):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from embtables.pipelines.data.batches import iterate_batches
    from embtables.pipelines.data.ray_data import HASH, shard_batches, sorted_contains, to_batch

    stats = json.loads((synth / "stats.json").read_text())
    table = pq.read_table(synth / stats["splits"]["valid"]["files"][0]).slice(0, 100)
    table = table.append_column(HASH, pa.array(np.arange(100, dtype=np.uint64) * 7919))
    mine = to_batch(table, stats, "valid")
    ref = next(iterate_batches(synth, "valid", 100, shuffle=False))
    assert torch.equal(mine.label, ref.label) and torch.allclose(mine.dense, ref.dense)
    assert torch.equal(mine.sparse.values(), ref.sparse.values())
    assert torch.equal(mine.sparse.lengths(), ref.sparse.lengths())
    assert sorted_contains(np.array([3, 9], np.uint64), np.array([9, 4, 3, 10], np.uint64)).tolist() == [
        True, False, True, False]

    class Shard:  # the two methods of a Ray DataIterator that shard_batches uses
        def iter_batches(self, batch_size, **_):
            for a in range(0, table.num_rows, 30):
                yield table.slice(a, 30)

    skip = np.sort(table.column(HASH).to_numpy()[::3])
    batches = list(shard_batches(Shard(), stats, "valid", 25, skip=skip))
    assert [b.rows for b in batches] == [25, 25, 16]  # rebatched after the 34 skipped rows
    seen = np.concatenate([b.hashes for b in batches])
    assert len(set(seen.tolist()) | set(skip.tolist())) == 100 and not sorted_contains(skip, seen).any()


# --- the sharded lookup without Ray ------------------------------------------------------
def _reference_and_sharded(rank, world, port, sets, sharding):
    """In a spawned process: join a gloo group, then build the single-process model and the same
    model under DistributedModelParallel with the reference's initial tables.
    Returns (cfg, inputs, ref, model, dmp, plan)."""
    import torch.distributed as dist

    from embtables.pipelines.train.build import build_model, resolve_inputs
    from embtables.pipelines.train.sharding import load_full_tables, plan_sharding, shard_model, sharded_lookup

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg = load_config(None, sets)
    inputs = resolve_inputs(cfg)
    torch.manual_seed(0)
    ref = build_model(cfg, inputs)
    torch.manual_seed(0)
    lr, eps = cfg["embedding"]["lr"], cfg["embedding"]["eps"]
    model = build_model(cfg, inputs, sharded_lookup=lambda tables, keys: sharded_lookup(tables, keys, lr, eps))
    plan, sharders = plan_sharding(model, world, sharding, torch.device("cpu"), 64)
    dmp = shard_model(model, plan, sharders, torch.device("cpu"))
    weights = dict(zip([t.name for t in ref.embeddings.tables], ref.embeddings.lookup.table_weights()))
    load_full_tables(dmp, lambda name: weights[name])
    return cfg, inputs, ref, model, dmp, plan


def _sharded_equals_unsharded(rank, world, data, port, result_dir, sets=()):

    from embtables.pipelines.data.batches import iterate_batches
    from embtables.pipelines.train.dist_checkpoint import save_sharded
    from embtables.pipelines.train.sharding import plan_summary
    from embtables.pipelines.train.local import make_model_optimizer

    sets = [f"data.train={data}", "embedding.dim=6", *sets]  # 6: padded to 8 for TBE
    cfg, inputs, ref, model, dmp, plan = _reference_and_sharded(rank, world, port, sets, "column_wise")
    batch = next(iterate_batches(inputs.dataset, "valid", 64, shuffle=False))
    ref.eval()
    dmp.eval()
    with torch.no_grad():
        diff = (ref(batch.dense[:, inputs.dense_index], batch.sparse)
                - dmp(batch.dense[:, inputs.dense_index], batch.sparse)).abs().max().item()
    dmp.train()
    optimizer = make_model_optimizer(cfg["train"], model)
    for batch in iterate_batches(inputs.dataset, "train", 256, shuffle=False, shard=(rank, world)):
        logits = dmp(batch.dense[:, inputs.dense_index], batch.sparse)
        torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.label).backward()
        optimizer.step()
        optimizer.zero_grad()
    import numpy as np

    summary = plan_summary(plan, model.embeddings, world)
    save_sharded(result_dir, 5, dmp, optimizer, {"epoch": 0, "step": 5}, np.zeros(0, np.uint64), summary)
    batch = next(iterate_batches(inputs.dataset, "valid", 64, shuffle=False))
    dmp.eval()
    with torch.no_grad():
        trained = dmp(batch.dense[:, inputs.dense_index], batch.sparse)
    if rank == 0:
        torch.save({"diff": diff, "trained": trained, "summary": summary}, Path(result_dir) / "result.pt")
    end_spawned_rank()


SHARED_TABLES = ("embedding.compression.method=multiplexed", "embedding.compression.ratio=4")
# The mean combiner pools through per-sample weights w/Σw set in remap: the sharded EBC must use them.
MEAN_COMBINER = (*SHARED_TABLES, "embedding.compression.combiner=mean")


@pytest.mark.parametrize("sets,data", [((), "synth"), (SHARED_TABLES, "synth"), (MEAN_COMBINER, "synth_multi_hot")],
                         ids=["full", "multiplexed", "multiplexed-mean-multi-hot"])
def test_sharded_lookup_matches_the_fused_one_and_checkpoints_read_whole(request, tmp_path, sets, data):
    """Column-wise shards of padded (6 → 8) tables: same outputs as one process; the sharded
    checkpoint loads into the single-process model with the same predictions. Multiplexed
    reads one table under several lookup keys (TorchRec: one table, several feature names)."""
    import torch.multiprocessing as mp

    synth = request.getfixturevalue(data)

    from embtables.pipelines.train.checkpoint import latest_checkpoint, load_checkpoint, load_model_state
    from embtables.pipelines.train.build import build_model, resolve_inputs
    from embtables.pipelines.data.batches import iterate_batches

    mp.spawn(_sharded_equals_unsharded, args=(2, synth, free_port(), tmp_path, sets), nprocs=2)
    result = torch.load(tmp_path / "result.pt", weights_only=False)
    assert result["diff"] < 1e-6
    # Every table split (the multiplexed tables are 4 wide after padding: too narrow to split).
    assert all(len(t["ranks"]) == 2 for t in result["summary"]["tables"].values() if not sets)
    cfg = load_config(None, [f"data.train={synth}", "embedding.dim=6", *sets])
    inputs = resolve_inputs(cfg)
    model = build_model(cfg, inputs)
    if sets:
        assert len(model.embeddings.keys) > len(model.embeddings.tables)  # some table serves several keys
    state = load_checkpoint(latest_checkpoint(tmp_path))
    assert state["tables"][f"{model.embeddings.tables[0].name}.weight"].shape[1] == 6
    assert all(v.abs().sum() > 0 for k, v in state["tables"].items() if k.endswith(".momentum"))
    load_model_state(model, state)
    model.eval()
    batch = next(iterate_batches(inputs.dataset, "valid", 64, shuffle=False))
    with torch.no_grad():
        mine = model(batch.dense[:, inputs.dense_index], batch.sparse)
    assert torch.allclose(mine, result["trained"], atol=1e-6)
    # Sharded checkpoints carry digests too: one flipped bit in a shard file is refused.
    from embtables.pipelines.train.checkpoint import CorruptCheckpoint

    shard = sorted(latest_checkpoint(tmp_path).glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint, match=shard.name):
        load_checkpoint(shard.parent)


def _padded_training(rank, data, port, result_dir):

    from embtables.pipelines.data.batches import iterate_batches
    from embtables.pipelines.train.local import make_model_optimizer

    sets = [f"data.train={data}", "embedding.dim=6", "embedding.backend=torch"]
    cfg, inputs, ref, model, dmp, _ = _reference_and_sharded(0, 1, port, sets, None)
    optimizers = [(ref, make_model_optimizer(cfg["train"], ref)), (dmp, make_model_optimizer(cfg["train"], model))]
    for i, batch in enumerate(iterate_batches(inputs.dataset, "train", 128, shuffle=False)):
        if i == 10:
            break
        for net, optimizer in optimizers:
            logits = net(batch.dense[:, inputs.dense_index], batch.sparse)
            torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.label).backward()
            optimizer.step()
            optimizer.zero_grad()
    batch = next(iterate_batches(inputs.dataset, "valid", 256, shuffle=False))
    ref.eval()
    dmp.eval()
    with torch.no_grad():
        diff = (ref(batch.dense[:, inputs.dense_index], batch.sparse)
                - dmp(batch.dense[:, inputs.dense_index], batch.sparse)).abs().max().item()
    torch.save({"diff": diff}, Path(result_dir) / "padded.pt")
    end_spawned_rank()


def test_padded_tables_train_exactly_like_unpadded_ones(synth, tmp_path):
    """dim 6 → TBE rows of 8: lr/eps scaled so row-wise Adagrad matches the torch reference."""
    import torch.multiprocessing as mp

    mp.spawn(_padded_training, args=(synth, free_port(), tmp_path), nprocs=1)
    assert torch.load(tmp_path / "padded.pt")["diff"] < 1e-5


# --- the Ray job --------------------------------------------------------------------------
@pytest.mark.slow  # whole Ray jobs: minutes on 2 cores; run by `make test-slow` and CI
def test_sigkill_then_resume_sees_every_row_exactly_epochs_times(synth, tmp_path):
    out = tmp_path / "run"
    proc = launch(synth, out, **{"train.workers": 2, "train.checkpoint_every_steps": 8})
    try:
        wait_for(lambda: mid_epoch_checkpoint(out), proc)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its Ray cluster, mid-epoch
        proc.wait(timeout=30)
    finally:
        kill_session(proc.pid)
    assert not (out / "metrics.json").exists()
    # Another seed would reshuffle mid-epoch: refused before Ray starts, naming the key.
    refused = subprocess.run(CLI + ["train", str(ROOT / "configs" / "demo.yaml"), "--out", str(out), "--resume"]
                             + [a for o in overrides(synth, **{"train.workers": 2, "train.seed": 7})
                                for a in ("--set", o)], cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode == 2 and "train.seed 0 → 7" in refused.stderr and "Traceback" not in refused.stderr
    finish(launch(synth, out, "--resume", **{"train.workers": 2, "train.checkpoint_every_steps": 8}))

    assert "resuming from step-" in (tmp_path / "run.log").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_rows_seen"] == 2 * train_rows(synth)
    assert metrics["valid_rows"] == json.loads((synth / "stats.json").read_text())["splits"]["valid"]["rows"]
    plan = json.loads((out / "plan.json").read_text())
    assert all(plan["tables_per_rank"]) and plan["world_size"] == 2  # tables on both ranks
    one = single_process_auc(synth, tmp_path / "one")
    assert abs(metrics["auc"] - one) < AUC_TOLERANCE, (metrics["auc"], one)
    # eval reads the sharded checkpoint whole, in one process
    scores = subprocess.run(CLI + ["eval", str(out)], cwd=ROOT, capture_output=True, text=True, check=True)
    assert abs(json.loads(scores.stdout)["auc"] - metrics["auc"]) < 1e-9
    # export gathers the 2-rank checkpoint too; scoring through the export gives the same AUC
    from embtables.pipelines.serve.export import export_run
    from embtables.pipelines.serve.predict import predict

    exported = export_run(out, tmp_path / "export")
    served = predict(exported, synth, tmp_path / "pred.parquet", split="valid", progress=False)
    assert abs(served["auc"] - metrics["auc"]) < 1e-4


@pytest.mark.slow  # whole Ray jobs: minutes on 2 cores; run by `make test-slow` and CI
def test_killed_worker_restarts_from_checkpoint_via_max_failures(synth, tmp_path):
    out = tmp_path / "run"
    method = {"embedding.compression.method": "qr", "embedding.compression.ratio": 4}
    settings = {"train.workers": 2, "train.max_failures": 1, "train.checkpoint_every_steps": 8, **method}
    proc = launch(synth, out, **settings)
    try:
        pid_file = out / "ray" / "worker-rank-1.pid"
        wait_for(lambda: mid_epoch_checkpoint(out), proc)
        first = int(pid_file.read_text())
        os.kill(first, signal.SIGKILL)  # one worker dies; Ray Train restarts the group
    except BaseException:
        kill_session(proc.pid)
        raise
    finish(proc)

    assert int(pid_file.read_text()) != first  # rank 1 came back as a new process
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_rows_seen"] == 2 * train_rows(synth)
    assert metrics["compression_ratio"] > 1.5
    one = single_process_auc(synth, tmp_path / "one", **method)
    assert abs(metrics["auc"] - one) < AUC_TOLERANCE, (metrics["auc"], one)
