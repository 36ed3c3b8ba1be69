"""The prefetching batch pipeline: the same batches in the same order as without it, the KJT's
host side done ahead without changing the model's output, errors surfacing as the same error
line, and no thread left running after an early exit."""
import shutil
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from embtables.config import load_config
from embtables.errors import ConfigError, DataError
from embtables.pipelines.cli.main import main
from embtables.pipelines.data.batches import iterate_batches
from embtables.pipelines.data.encode import load_stats
from embtables.pipelines.data.ingest_synth import ingest
from embtables.pipelines.data.prefetch import AUTO_DEPTH, prefetch_plan, prefetched
from embtables.pipelines.train.build import build_model, resolve_inputs

PIPELINE_THREADS = ("embtables-prefetch", "embtables-decode")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """Multi-hot synth data in row groups of 300: many buffers, batches straddle them."""
    return ingest(tmp_path_factory.mktemp("prefetch") / "synth", preset="tiny", rows=6000, seed=5, multi_hot=2,
                  row_group=300)


def config(tmp_path, synth, *sets):
    path = tmp_path / "cfg.yaml"
    path.write_text(f"data: {{train: {synth}}}\nmodel: {{name: dlrm, bottom_mlp: [8], top_mlp: [8]}}\n"
                    "embedding: {dim: 4, backend: torch}\ntrain: {batch_size: 256, epochs: 1, threads: 1}\n")
    return load_config(path, list(sets))


def contents(batches):
    return [(b.rows, b.label, b.dense, b.sparse.keys(), b.sparse.values(), b.sparse.lengths()) for b in batches]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x[0] == y[0] and x[3] == y[3]
        for s, t in zip(x[1:], y[1:]):
            if isinstance(s, torch.Tensor):
                assert torch.equal(s, t)


def live_pipeline_threads():
    return [t for t in threading.enumerate() if t.name.startswith(PIPELINE_THREADS) and t.is_alive()]


@pytest.mark.parametrize("start_row", [0, 1234])
def test_pipeline_yields_the_same_batches_in_the_same_order(synth, start_row):
    kw = dict(shuffle=True, seed=2, epoch=1, start_row=start_row)
    plain = contents(iterate_batches(synth, "train", 256, **kw))
    assert sum(r for r, *_ in plain) == load_stats(synth)["splits"]["train"]["rows"] - start_row
    for depth, workers in [(0, 1), (1, 1), (AUTO_DEPTH, 3)]:
        piped = prefetched(iterate_batches(synth, "train", 256, workers=workers, **kw), depth)
        assert_same(contents(piped), plain)


def test_row_order_does_not_depend_on_batch_size(synth):
    """Each batch gathers its own rows of the buffer's permutation: cutting differently, or
    resuming mid-buffer, gives the same row stream."""
    def stream(batch_size, start_row=0):
        bs = list(iterate_batches(synth, "train", batch_size, shuffle=True, seed=4, start_row=start_row))
        return (torch.cat([b.dense for b in bs]), torch.cat([b.sparse["M1"].values() for b in bs]),
                torch.cat([b.sparse["M1"].lengths() for b in bs]))

    ref = stream(1000)
    for other in (stream(7), stream(256)):
        assert all(torch.equal(a, b) for a, b in zip(ref, other))
    resumed = stream(64, start_row=777)
    assert torch.equal(resumed[0], ref[0][777:])
    skipped_values = int(ref[2][:777].sum())
    assert torch.equal(resumed[1], ref[1][skipped_values:])


def test_host_side_of_the_kjt_runs_ahead_without_changing_the_output(tmp_path, synth):
    from embtables.pipelines.train.local import LocalRun, make_model_optimizer

    cfg = config(tmp_path, synth)
    inputs = resolve_inputs(cfg)
    model = build_model(cfg, inputs)
    run = LocalRun(cfg, tmp_path, inputs, model, make_model_optimizer(cfg["train"], model))
    batches = run.batches(0, {"rows_in_epoch": 0})
    ready = next(batches)
    batches.close()
    assert ready.sparse.keys() == model.embeddings.input_keys
    assert ready.sparse.offsets_or_none() is not None  # done on the producer thread
    assert run.to_device(ready).sparse is ready.sparse  # nothing left for the step on CPU
    raw = next(iterate_batches(synth, "train", 256, shuffle=True, seed=cfg["train"]["seed"]))
    scrambled = raw.sparse.permute(list(reversed(range(len(raw.sparse.keys())))))
    model.eval()
    with torch.no_grad():
        dense = raw.dense[:, inputs.dense_index]
        assert torch.equal(model(dense, ready.sparse), model(dense, scrambled))


def test_plan_is_sized_for_the_machine():
    assert prefetch_plan("auto", cores=2) == (0, 1)  # the step keeps both cores busy: inline
    assert prefetch_plan("auto", cores=4) == (AUTO_DEPTH, 1)
    assert prefetch_plan("auto", cores=16) == (AUTO_DEPTH, 4)
    assert prefetch_plan(3, cores=16) == (3, 1) and prefetch_plan(0) == (0, 1)


def test_prefetch_is_on_by_default_and_validated(tmp_path, synth):
    assert config(tmp_path, synth)["train"]["prefetch"] == "auto"
    assert config(tmp_path, synth, "train.prefetch=0")["train"]["prefetch"] == 0
    for bad in ("-1", "fast", "1.5"):
        with pytest.raises(ConfigError, match="train.prefetch.*auto or an integer"):
            config(tmp_path, synth, f"train.prefetch={bad}")


def _bad_id(synth, dst, row):
    shutil.copytree(synth, dst)
    part = dst / "train" / "part-00000.parquet"
    t = pq.read_table(part)
    ids = t["C2"].to_numpy().copy()
    ids[row] = 10 ** 6
    pq.write_table(t.set_column(t.schema.get_field_index("C2"), "C2", pa.array(ids)), part, row_group_size=300)
    return dst


def test_producer_error_surfaces_as_the_same_error_line(tmp_path, synth, capsys):
    bad = _bad_id(synth, tmp_path / "bad", 4000)  # in a late buffer: raised on the producer thread
    lines = []
    for prefetch in ("0", "2"):  # inline, and on the producer thread
        cfg = tmp_path / f"c{prefetch}.yaml"
        cfg.write_text(f"data: {{train: {bad}}}\nmodel: {{name: dlrm, bottom_mlp: [8], top_mlp: [8]}}\n"
                       f"embedding: {{dim: 4, backend: torch}}\ntrain: {{batch_size: 256, threads: 1, "
                       f"prefetch: {prefetch}}}\n")
        capsys.readouterr()
        assert main(["train", str(cfg), "--out", str(tmp_path / f"run{prefetch}"), "--quiet"]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith("error: ") and "row 4000" in err[0], err
        lines.append(err[0])
    assert lines[0] == lines[1]
    assert not live_pipeline_threads()
    with pytest.raises(DataError, match="row 4000"):  # the reader's own exception type, re-raised
        list(prefetched(iterate_batches(bad, "train", 256, shuffle=False, workers=2), 2))


def test_early_exit_stops_the_threads(tmp_path, synth):
    from embtables.pipelines.train.local import train

    before = threading.active_count()
    metrics = train(config(tmp_path, synth, "train.max_steps=3", "train.prefetch=1"), tmp_path / "run",
                    progress=False)
    assert metrics["steps"] == 3
    assert not live_pipeline_threads()
    batches = prefetched(iterate_batches(synth, "train", 64, shuffle=True, workers=3), 2)
    next(batches)
    assert live_pipeline_threads()  # the producer and its decode threads are running
    batches.close()
    assert not live_pipeline_threads()
    assert threading.active_count() <= before
    assert np.isfinite(metrics["auc"])
