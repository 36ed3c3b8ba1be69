"""Issue 14, the data and serving side: each case a careless or hostile user tried, at the CLI.

Ingest, export and predict refuse what they cannot represent or must not overwrite, with one
`error:` line and exit code 2; a run is bound to its dataset (fingerprint, vocabularies, a
readers' lock); exports detect edits to their manifest; nothing half-written or hidden is left.
"""
from __future__ import annotations

import errno
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import embtables
from embtables.errors import DataError, ExportError
from embtables.pipelines.cli.main import main
from embtables.pipelines.data.encode import load_stats
from embtables.pipelines.data.identity import dataset_fingerprint, reading_dataset

REPO = Path(__file__).resolve().parents[1]
CONFIG = """\
data: {{train: {data}}}
model: {{name: dlrm, bottom_mlp: [16], top_mlp: [16]}}
embedding: {{dim: 8}}
train: {{batch_size: 256, epochs: {epochs}, threads: 1, prefetch: 0, eval_batch_size: 4096}}
"""


def cli(capsys, *argv) -> tuple[int, str]:
    """(exit code, stderr) of `embtables ARGV`."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def one_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def hidden_siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def synth(capsys, out: Path, seed: int = 0, rows: int = 3000) -> Path:
    rc, err = cli(capsys, "data", "synth", out, "--preset", "tiny", "--rows", rows, "--seed", seed)
    assert rc == 0, err
    return out


def config(tmp: Path, data: Path, epochs: int = 1) -> Path:
    path = tmp / f"cfg-{data.name}-{epochs}.yaml"
    path.write_text(CONFIG.format(data=data, epochs=epochs))
    return path


def train(capsys, tmp: Path, data: Path, out: Path, epochs: int = 1) -> Path:
    rc, err = cli(capsys, "train", config(tmp, data, epochs), "--out", out, "--quiet")
    assert rc == 0, err
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(tmp, dataset, run, export) on the tiny synthetic preset."""
    tmp = tmp_path_factory.mktemp("reliability")
    capsys = _NoCapture()
    ds = synth(capsys, tmp / "ds")
    run = train(capsys, tmp, ds, tmp / "run")
    assert main(["export", str(run), "--out", str(tmp / "ex")]) == 0
    return tmp, ds, run, tmp / "ex"


class _NoCapture:
    """capsys stand-in for module fixtures (output goes to the test log)."""

    def readouterr(self):
        class R:
            out = err = ""
        return R()


def raw_parquet(path: Path, n: int = 400, seed: int = 0, dense=None, label=None) -> Path:
    rng = np.random.default_rng(seed)
    cols = {"label": label if label is not None else rng.integers(0, 2, n),
            "x": dense if dense is not None else rng.random(n) * 10,
            "a": rng.integers(0, 30, n), "b": [f"v{k}" for k in rng.integers(0, 20, n)]}
    pq.write_table(pa.table(cols), path)
    return path


# ---------------------------------------------------------------- 1. predict --out

def test_predict_never_overwrites_its_input_or_an_existing_file(capsys, trained, tmp_path):
    _, ds, _, ex = trained
    source = ds / "valid" / "part-00000.parquet"
    data = tmp_path / "in.parquet"
    data.write_bytes(source.read_bytes())
    before = data.read_bytes()
    for out, force in ((data, False), (data, True)):
        rc, err = cli(capsys, "predict", ex, data, "--out", out, "--quiet", *(["--force"] if force else []))
        assert rc == 2 and "is an input of this command" in one_error(err)
    link = tmp_path / "link.parquet"
    link.symlink_to(data)  # the same file under another name
    rc, err = cli(capsys, "predict", ex, data, "--out", link, "--quiet", "--force")
    assert rc == 2 and "is an input" in one_error(err)
    rc, err = cli(capsys, "predict", ex, data, "--out", ex / "manifest.json", "--quiet", "--force")
    assert rc == 2 and "is an input" in one_error(err)
    assert data.read_bytes() == before

    out = tmp_path / "p.parquet"
    assert cli(capsys, "predict", ex, data, "--out", out, "--quiet")[0] == 0
    rc, err = cli(capsys, "predict", ex, data, "--out", out, "--quiet")
    assert rc == 2 and "exists; pass --force" in one_error(err)
    out.write_bytes(b"mine")
    assert cli(capsys, "predict", ex, data, "--out", out, "--quiet")[0] == 2 and out.read_bytes() == b"mine"
    assert cli(capsys, "predict", ex, data, "--out", out, "--quiet", "--force")[0] == 0
    assert pq.read_table(out).num_rows == pq.read_metadata(data).num_rows
    nested = tmp_path / "new" / "dir" / "p.parquet"  # missing parents are made, as before
    assert cli(capsys, "predict", ex, data, "--out", nested, "--metrics", nested.with_suffix(".json"),
               "--quiet")[0] == 0 and nested.is_file() and nested.with_suffix(".json").is_file()
    rc, err = cli(capsys, "predict", ex, data, "--out", tmp_path / "m.json", "--metrics", data, "--quiet")
    assert rc == 2 and "--metrics" in one_error(err)
    assert hidden_siblings(out) == []


def test_predict_checks_out_before_any_work(capsys, trained, tmp_path, monkeypatch):
    _, ds, _, ex = trained
    import embtables.serving.inference as inference

    def no_work(*a, **k):
        raise AssertionError("the export was loaded before --out was checked")

    monkeypatch.setattr(inference, "load", no_work)
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    for out, message in ((tmp_path / "dir", "is a directory"), (tmp_path / "file" / "p.parquet", "is not a directory")):
        rc, err = cli(capsys, "predict", ex, ds, "--out", out, "--quiet")
        assert rc == 2 and message in one_error(err)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_predict_out_in_a_read_only_dir(capsys, trained, tmp_path):
    _, ds, _, ex = trained
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    rc, err = cli(capsys, "predict", ex, ds, "--out", ro / "p.parquet", "--quiet")
    assert rc == 2 and "permission denied" in one_error(err)


# ---------------------------------------------------------------- 2. values beyond float32

def test_dense_beyond_float32_is_an_ingest_error(capsys, tmp_path):
    dense = np.ones(400)
    dense[123] = 1e300
    raw = raw_parquet(tmp_path / "big.parquet", dense=dense)
    rc, err = cli(capsys, "data", "parquet", raw, tmp_path / "ds", "--label", "label", "--dense", "x",
                  "--sparse", "a,b")
    line = one_error(err)
    assert rc == 2 and str(raw) in line and "row 123" in line and "'x'" in line and "float32" in line
    assert not (tmp_path / "ds").exists() and hidden_siblings(tmp_path / "ds") == []

    header = "label," + ",".join(f"I{i}" for i in range(1, 14)) + "," + ",".join(f"C{i}" for i in range(1, 27))
    rows = [f"{i % 2}," + ",".join(["1"] * 13) + "," + ",".join(["aa"] * 26) for i in range(20)]
    rows[5] = "1," + ",".join(["1"] * 6 + ["1e39"] + ["1"] * 6) + "," + ",".join(["aa"] * 26)
    tsv = tmp_path / "criteo.txt.gz"
    with gzip.open(tsv, "wt") as f:
        f.write("\n".join(r.replace(",", "\t") for r in rows) + "\n")
    csv = tmp_path / "criteo.csv"
    csv.write_text(header + "\n" + "\n".join(rows) + "\n")
    for raw, line_no in ((tsv, 6), (csv, 7)):
        rc, err = cli(capsys, "data", "criteo", raw, tmp_path / "c")
        line = one_error(err)
        assert rc == 2 and str(raw) in line and f"line {line_no}" in line and "I7" in line and "float32" in line
    assert not (tmp_path / "c").exists()


def test_predict_input_beyond_float32_is_an_error(capsys, trained, tmp_path):
    _, ds, _, ex = trained
    t = pq.read_table(ds / "valid" / "part-00000.parquet")
    name = load_stats(ds)["dense"][0]
    x = t[name].to_numpy().astype(np.float64)
    x[7] = 1e300
    bad = tmp_path / "bad.parquet"
    pq.write_table(t.set_column(t.schema.get_field_index(name), name, pa.array(x)), bad)
    rc, err = cli(capsys, "predict", ex, bad, "--out", tmp_path / "p.parquet", "--quiet")
    line = one_error(err)
    assert rc == 2 and "row 7" in line and name in line and "1e+300" in line and "float32" in line
    assert not (tmp_path / "p.parquet").exists()


# ---------------------------------------------------------------- 3. re-ingest under a running training

def test_reingest_while_training_is_refused_and_the_run_sees_one_dataset(capsys, tmp_path, monkeypatch):
    import embtables.pipelines.train.local as local

    ds = synth(capsys, tmp_path / "ds")
    rows = load_stats(ds)["splits"]["train"]["rows"]
    attempts = []
    real_evaluate = local.evaluate

    def evaluate_and_reingest(*args, **kwargs):  # between epochs, someone re-ingests the dataset
        attempts.append(main(["data", "synth", str(ds), "--preset", "tiny", "--rows", "3000", "--seed", "7"]))
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(local, "evaluate", evaluate_and_reingest)
    fingerprint = dataset_fingerprint(ds)
    rc, err = cli(capsys, "train", config(tmp_path, ds, epochs=2), "--out", tmp_path / "run", "--quiet")
    assert rc == 0 and attempts == [2, 2] and err.count("is being read by a running job") == 2
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["train_rows_seen"] == 2 * rows and dataset_fingerprint(ds) == fingerprint
    assert main(["data", "synth", str(ds), "--preset", "tiny", "--rows", "3000", "--seed", "7"]) == 0  # now free


def test_a_switched_dataset_stops_training_naming_both_fingerprints(capsys, tmp_path, monkeypatch):
    """Where the lock cannot work (e.g. a network filesystem), the fingerprint check still does."""
    import contextlib

    import embtables.pipelines.data.identity as identity
    import embtables.pipelines.train.local as local

    ds = synth(capsys, tmp_path / "ds")
    old = dataset_fingerprint(ds)
    monkeypatch.setattr(local, "reading_dataset", lambda path: contextlib.nullcontext())
    real_evaluate = local.evaluate

    def evaluate_and_reingest(*args, **kwargs):
        assert main(["data", "synth", str(ds), "--preset", "tiny", "--rows", "3000", "--seed", "7"]) == 0
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(local, "evaluate", evaluate_and_reingest)
    assert identity.dataset_fingerprint(ds) == old
    rc, err = cli(capsys, "train", config(tmp_path, ds, epochs=2), "--out", tmp_path / "run", "--quiet")
    line = one_error(err)
    assert rc == 2 and old[:16] in line and dataset_fingerprint(ds)[:16] in line


def test_ingest_refuses_a_dataset_a_job_reads(capsys, tmp_path):
    ds = synth(capsys, tmp_path / "ds")
    before = dataset_fingerprint(ds)
    with reading_dataset(ds):
        rc, err = cli(capsys, "data", "synth", ds, "--preset", "tiny", "--rows", "3000", "--seed", "3")
        assert rc == 2 and "being read by a running job" in one_error(err)
    assert dataset_fingerprint(ds) == before and hidden_siblings(ds) == []


# ---------------------------------------------------------------- 4. eval / resume on other data

def test_eval_refuses_other_vocabularies_and_a_replaced_dataset(capsys, trained, tmp_path):
    tmp, ds, run, ex = trained
    other = synth(capsys, tmp_path / "other", seed=5)
    rc, err = cli(capsys, "eval", run, other)
    line = one_error(err)
    assert rc == 2 and "another vocabulary" in line and str(other) in line and str(run) in line
    rc, err = cli(capsys, "predict", ex, other, "--out", tmp_path / "p.parquet", "--quiet")
    assert rc == 2 and "another vocabulary" in one_error(err)

    unrelated = tmp_path / "unrelated"
    rc, err = cli(capsys, "data", "parquet", raw_parquet(tmp_path / "u.parquet"), unrelated, "--label", "label",
                  "--dense", "x", "--sparse", "a,b")
    assert rc == 0, err
    rc, err = cli(capsys, "eval", run, unrelated)
    assert rc == 2 and "lacks the features" in one_error(err)
    assert cli(capsys, "eval", run, ds)[0] == 0  # the run's own data: fine

    copy = tmp_path / "run-copy"  # a run whose dataset was re-ingested with other rows since
    import shutil
    shutil.copytree(run, copy)
    moved = tmp_path / "ds2"
    shutil.copytree(ds, moved)
    record = json.loads((copy / "run.json").read_text())
    record["config"]["data"]["train"] = record["dataset"] = str(moved)
    (copy / "run.json").write_text(json.dumps(record))
    recorded = record["dataset_fingerprint"]
    synth(capsys, moved, seed=9)
    rc, err = cli(capsys, "eval", copy)
    line = one_error(err)
    assert rc == 2 and recorded[:16] in line and dataset_fingerprint(moved)[:16] in line


# ---------------------------------------------------------------- 7. manifest checksum

def _edit(src: Path, dst: Path, change) -> Path:
    import shutil
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    change(m)
    (dst / "manifest.json").write_text(json.dumps(m, indent=1))
    return dst


def test_manifest_edits_are_detected(capsys, trained, tmp_path):
    _, ds, _, ex = trained
    assert len(json.loads((ex / "manifest.json").read_text())["dense"]) >= 2
    swapped = _edit(ex, tmp_path / "swapped", lambda m: m["dense"].reverse())
    dropped = _edit(ex, tmp_path / "dropped", lambda m: m["files"].pop("vocab/C1.parquet"))
    unsigned = _edit(ex, tmp_path / "unsigned", lambda m: m.pop("manifest_sha256"))
    for bad in (swapped, dropped, unsigned):
        with pytest.raises(ExportError, match="manifest_sha256"):
            embtables.load(bad)
        rc, err = cli(capsys, "predict", bad, ds, "--out", tmp_path / f"{bad.name}.parquet", "--quiet")
        assert rc == 2 and "manifest_sha256" in one_error(err)

    def resign(m):  # an edit that also recomputes the digest: the deleted entry's file is still checked
        from embtables.serving.format import manifest_digest
        m["files"].pop("vocab/C1.parquet")
        m["manifest_sha256"] = manifest_digest(m)

    with pytest.raises(ExportError, match=r"vocab/C1\.parquet.*not in manifest"):
        embtables.load(_edit(ex, tmp_path / "resigned", resign))
    reformatted = _edit(ex, tmp_path / "reformatted", lambda m: None)  # indent/spacing changes are fine
    assert embtables.load(reformatted).features == embtables.load(ex).features


# ---------------------------------------------------------------- 11. degenerate data

@pytest.mark.parametrize("fraction", ["0", "-0.1", "1", "1.5"])
def test_valid_fraction_outside_0_1_is_refused(capsys, tmp_path, fraction):
    raw = raw_parquet(tmp_path / "r.parquet")
    rc, err = cli(capsys, "data", "parquet", raw, tmp_path / "ds", "--label", "label", "--sparse", "a,b",
                  f"--valid-fraction={fraction}")
    assert rc == 2 and "--valid-fraction must be between 0 and 1" in one_error(err)
    rc, err = cli(capsys, "data", "criteo", REPO / "data/samples/criteo_sample.txt", tmp_path / "c",
                  f"--valid-fraction={fraction}")
    assert rc == 2 and "--valid-fraction" in one_error(err)
    assert not (tmp_path / "ds").exists() and not (tmp_path / "c").exists()


def test_labels_of_one_class_are_refused(capsys, tmp_path):
    raw = raw_parquet(tmp_path / "ones.parquet", label=np.ones(400, dtype=np.int64))
    rc, err = cli(capsys, "data", "parquet", raw, tmp_path / "ds", "--label", "label", "--sparse", "a,b")
    line = one_error(err)
    assert rc == 2 and "train split" in line and "is 1" in line and not (tmp_path / "ds").exists()
    train = raw_parquet(tmp_path / "t.parquet")
    valid = raw_parquet(tmp_path / "v.parquet", n=50, label=np.zeros(50, dtype=np.int64))
    rc, err = cli(capsys, "data", "parquet", train, tmp_path / "ds", "--valid", valid, "--label", "label",
                  "--sparse", "a,b")
    line = one_error(err)
    assert rc == 2 and "valid split" in line and str(valid) in line


# ---------------------------------------------------------------- 13. shipped configs

SHIPPED = {  # config → the ingest its header names, on the shipped sample of that dataset
    "avazu_dcnv2": ["avazu", "data/samples/avazu_sample.txt"],
    "criteo_dlrm": ["criteo", "data/samples/criteo_sample.txt"],
    "demo": ["movielens", "data/samples/movielens_sample.txt"],
    "movielens_dcnv2": ["movielens", "data/samples/movielens_sample.txt"],
    "synth_dlrm": ["synth", "--preset", "criteo26", "--rows", "3000"],
    "synth_tail": ["synth", "--preset", "criteo26-tail", "--rows", "3000"],
}


def test_every_shipped_config_is_covered():
    assert sorted(p.stem for p in (REPO / "configs").glob("*.yaml")) == sorted(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_config_trains_on_its_sample(capsys, tmp_path, name):
    source, *rest = SHIPPED[name]
    header = (REPO / "configs" / f"{name}.yaml").read_text().split("\n", 3)[:3]
    assert any(f"embtables data {source}" in line for line in header), header
    ds = tmp_path / "ds"
    argv = ["data", source, *([str(REPO / rest[0])] if source != "synth" else []), ds,
            *(rest[1:] if source != "synth" else rest)]
    rc, err = cli(capsys, *argv)
    assert rc == 0, err
    rc, err = cli(capsys, "train", REPO / "configs" / f"{name}.yaml", "--set", f"data.train={ds}",
                  "--set", "train.max_steps=2", "--set", "train.epochs=1", "--set", "train.batch_size=64",
                  "--set", "train.threads=1", "--out", tmp_path / "run", "--quiet")
    assert rc == 0, err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 2 and 0 <= metrics["auc"] <= 1


def test_an_explicit_label_that_differs_still_errors(capsys, tmp_path):
    ds = tmp_path / "ds"
    assert cli(capsys, "data", "avazu", REPO / "data/samples/avazu_sample.txt", ds)[0] == 0
    rc, err = cli(capsys, "train", REPO / "configs/avazu_dcnv2.yaml", "--set", f"data.train={ds}",
                  "--set", "data.label=label", "--out", tmp_path / "run", "--quiet")
    assert rc == 2 and "encoded with label 'click'" in one_error(err)


# ---------------------------------------------------------------- 9. temporaries and partial output

def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporaries_of_killed_commands_are_cleaned(capsys, trained, tmp_path):
    _, ds, run, ex = trained
    pid = dead_pid()
    live = f".d.building-{os.getpid()}-0000abcd"
    stale = {
        tmp_path / f".d.raw-{pid}-0123abcd": "dir", tmp_path / f".d.building-{pid}-4567abcd": "dir",
        tmp_path / f".e.building-{pid}-89ababcd": "dir", tmp_path / f".p.parquet.writing-{pid}-cdcdcdcd": "file",
    }
    for path, kind in stale.items():
        (path.mkdir() if kind == "dir" else path.write_bytes(b"partial"))
    (tmp_path / live).mkdir()  # a live process's build: left alone
    assert cli(capsys, "data", "synth", tmp_path / "d", "--preset", "tiny", "--rows", "3000")[0] == 0
    assert cli(capsys, "export", run, "--out", tmp_path / "e")[0] == 0
    assert cli(capsys, "predict", ex, ds, "--out", tmp_path / "p.parquet", "--quiet")[0] == 0
    assert not any(p.exists() for p in stale) and (tmp_path / live).exists()


def test_disk_full_leaves_no_partial_output(capsys, trained, tmp_path, monkeypatch):
    _, ds, run, ex = trained
    old = synth(capsys, tmp_path / "d")
    before = dataset_fingerprint(old)
    assert cli(capsys, "export", run, "--out", tmp_path / "e")[0] == 0
    exported = (tmp_path / "e" / "manifest.json").read_text()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    def fails(*argv) -> bool:
        rc, err = cli(capsys, *argv)
        return rc == 2 and "No space left on device" in one_error(err)

    with monkeypatch.context() as m:
        m.setattr(pq.ParquetWriter, "write_table", full)
        assert fails("data", "synth", old, "--preset", "tiny", "--rows", "3000", "--seed", "4")
        assert fails("predict", ex, ds, "--out", tmp_path / "p.parquet", "--quiet")
    import embtables.pipelines.serve.export as export_mod
    with monkeypatch.context() as m:
        m.setattr(export_mod, "save_file", full)
        assert fails("export", run, "--out", tmp_path / "e", "--quantize", "int8")
    assert dataset_fingerprint(old) == before and (tmp_path / "e" / "manifest.json").read_text() == exported
    assert not (tmp_path / "p.parquet").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------- SIGKILL at any point

KILL = """
import os, signal, sys
import {module} as target
real = target.{name}
calls = [0]
def hook(*args, **kwargs):
    calls[0] += 1
    if calls[0] == {nth} and {before}:
        os.kill(os.getpid(), signal.SIGKILL)
    out = real(*args, **kwargs)
    if calls[0] == {nth} and not {before}:
        os.kill(os.getpid(), signal.SIGKILL)
    return out
target.{name} = hook
from embtables.pipelines.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def killed(argv, module: str, name: str, nth: int = 1, before: bool = True) -> int:
    code = KILL.format(module=module, name=name, nth=nth, before=before)
    return subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True).returncode


INGEST_POINTS = [  # (module, function, nth call, kill before (else after) it)
    ("pyarrow.parquet", "ParquetWriter.write_table", 2, True),     # mid-encode
    ("embtables.atomic", "swap", 1, True),                          # complete, not yet swapped in
    ("embtables.atomic", "swap", 1, False),                         # swapped in, the old one not yet deleted
]


@pytest.mark.slow
@pytest.mark.parametrize("point", INGEST_POINTS)
def test_sigkill_during_ingest_keeps_old_or_new(capsys, tmp_path, point):
    ds = synth(capsys, tmp_path / "ds")
    old = dataset_fingerprint(ds)
    argv = ["data", "synth", ds, "--preset", "tiny", "--rows", "3000", "--seed", "1"]
    module, name, nth, before = point
    assert killed(argv, module, name, nth, before) == -9
    state = dataset_fingerprint(ds)  # loads: the dataset is complete, old or new
    assert state == old if before else state != old
    assert cli(capsys, *argv)[0] == 0
    assert hidden_siblings(ds) == [] and dataset_fingerprint(ds) != old


@pytest.mark.slow
@pytest.mark.parametrize("before", [True, False])
def test_sigkill_during_export_and_predict_keeps_old_or_new(capsys, trained, tmp_path, before):
    _, ds, run, ex = trained
    out = tmp_path / "e"
    assert cli(capsys, "export", run, "--out", out)[0] == 0
    assert killed(["export", run, "--out", out, "--quantize", "int8"], "embtables.atomic", "swap", 1, before) == -9
    assert (json.loads((out / "manifest.json").read_text())["precision"] == "none") == before
    assert embtables.load(out) is not None
    assert cli(capsys, "export", run, "--out", out)[0] == 0 and hidden_siblings(out) == []
    assert json.loads((out / "manifest.json").read_text())["precision"] == "none"

    pred = tmp_path / "p.parquet"
    argv = ["predict", ex, ds, "--out", pred, "--quiet", "--force"]
    # before: mid-write; after: renamed in, its directory not yet synced
    point = ("pyarrow.parquet", "ParquetWriter.write_table") if before else ("embtables.atomic", "_fsync_dir")
    assert killed(argv, *point, 1, True) == -9
    assert pred.exists() == (not before)
    if pred.exists():
        assert pq.read_table(pred).num_rows > 0
    assert cli(capsys, *argv)[0] == 0 and hidden_siblings(pred) == []


def test_fingerprint_of_a_dataset_from_before_fingerprints(capsys, tmp_path):
    """Older datasets (no stored fingerprint) get a cheap one that a rewrite of any file changes."""
    ds = synth(capsys, tmp_path / "ds")
    stats = json.loads((ds / "stats.json").read_text())
    del stats["fingerprint"]
    (ds / "stats.json").write_text(json.dumps(stats))
    first = dataset_fingerprint(ds)
    assert dataset_fingerprint(ds) == first
    part = ds / "train" / "part-00000.parquet"
    data = part.read_bytes()
    part.unlink()
    part.write_bytes(data[:-1] + bytes([data[-1]]))
    os.utime(part, ns=(1, 1))
    assert dataset_fingerprint(ds) != first
