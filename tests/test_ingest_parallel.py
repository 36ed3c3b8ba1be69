"""The ingest passes spread over threads (or Ray tasks) write the same bytes as one worker."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embtables.errors import DataError
from embtables.pipelines.data.encode import VocabIndex, prepare_parquet
from embtables.pipelines.data.ingest_plan import Runner, plan_pieces


def files_of(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def raw_files(tmp_path: Path, n_files: int = 3, rows: int = 700) -> Path:
    """Several files, small row groups, frequency ties, multi-hot lists, strings, ints, nulls."""
    raw = tmp_path / "raw"
    raw.mkdir()
    rng = np.random.default_rng(7)
    for f in range(n_files):
        n = rows + 37 * f  # files and row groups of uneven sizes
        ints = [None if k % 11 == 0 else int(v) for k, v in enumerate(rng.integers(0, 40, n))]
        strs = [None if k % 13 == 0 else f"s{v}" for k, v in enumerate(rng.integers(0, 60, n))]
        lists = [None if k % 17 == 0 else [int(x) if x % 9 else None for x in rng.integers(0, 30, k % 4)]
                 for k in range(n)]
        tie = [k % 5 for k in range(n)]  # five values, equal counts per file: ties broken by value
        dense = rng.normal(size=n)
        pq.write_table(pa.table({
            "y": rng.integers(0, 2, n), "x": pa.array(dense, mask=rng.random(n) < 0.1),
            "i": pa.array(ints, pa.int64()), "s": pa.array(strs, pa.string()),
            "m": pa.array(lists, pa.list_(pa.int64())), "t": tie}),
            raw / f"part-{f}.parquet", row_group_size=97 + 50 * f)
    return raw


def encode(raw, out, **kw):
    return prepare_parquet(raw, None, label="y", dense=["x"], sparse=["i", "s", "m", "t"], out=out,
                           row_group=128, **kw)


def test_threads_write_the_same_bytes_as_one_worker(tmp_path):
    raw = raw_files(tmp_path)
    serial = files_of(encode(raw, tmp_path / "serial", workers=1))
    for workers in (2, 5):
        assert files_of(encode(raw, tmp_path / f"w{workers}", workers=workers)) == serial
    # ...and the output is a real encoding: ties by value, nulls to OOV, lists kept.
    for name in ("i", "s", "m", "t"):
        v = pq.read_table(tmp_path / "serial" / "vocab" / f"{name}.parquet").to_pydict()
        keys = [(-c, x) for x, c in zip(v["value"], v["count"])]
        assert keys == sorted(keys)  # most frequent first, ties by value
    i = pq.read_table(tmp_path / "serial" / "vocab" / "i.parquet").to_pydict()["count"]
    assert len(set(i)) < len(i)  # the input does hold ties
    assert len(serial) > 6  # vocab files, several train/valid parts, stats.json


def test_encoded_pages_ids_delta_bit_packed_floats_byte_stream_split_lz4(tmp_path):
    out = encode(raw_files(tmp_path, n_files=1), tmp_path / "o", workers=1)
    part = sorted((out / "train").glob("*.parquet"))[0]
    meta = pq.ParquetFile(part).metadata.row_group(0)
    pages = {meta.column(i).path_in_schema: (meta.column(i).encodings, meta.column(i).compression)
             for i in range(meta.num_columns)}
    for ids in ("i", "s", "t", "m.list.element"):  # every id column, the multi-hot one's values too
        assert "DELTA_BINARY_PACKED" in pages[ids][0] and pages[ids][1] == "UNCOMPRESSED", ids
    for floats in ("y", "x"):
        assert "BYTE_STREAM_SPLIT" in pages[floats][0] and pages[floats][1] == "LZ4", floats
    assert not any(meta.column(i).has_dictionary_page for i in range(meta.num_columns))
    rows = pq.read_table(out / "train").to_pydict()  # and they read back as ids (40 values + OOV)
    assert max(rows["i"]) <= 40 and all(isinstance(v, list) for v in rows["m"])


def test_threads_with_a_separate_valid_set(tmp_path):
    raw = raw_files(tmp_path, n_files=2)
    valid = tmp_path / "raw" / "part-1.parquet"
    train = tmp_path / "raw" / "part-0.parquet"
    kw = dict(label="y", dense=["x"], sparse=["i", "s", "m"], row_group=64)
    one = prepare_parquet(train, valid, out=tmp_path / "one", workers=1, **kw)
    many = prepare_parquet(train, valid, out=tmp_path / "many", workers=3, **kw)
    assert files_of(one) == files_of(many)


def test_first_bad_row_in_stream_order_is_reported(tmp_path):
    raw = raw_files(tmp_path)
    bad = pq.read_table(raw / "part-2.parquet").to_pydict()
    bad["y"][500] = 3  # in a late row group of the last file
    pq.write_table(pa.table(bad, schema=pq.read_schema(raw / "part-2.parquet")), raw / "part-2.parquet",
                   row_group_size=50)
    early = pq.read_table(raw / "part-1.parquet").to_pydict()
    early["y"][200] = 7
    pq.write_table(pa.table(early, schema=pq.read_schema(raw / "part-1.parquet")), raw / "part-1.parquet",
                   row_group_size=50)
    for workers in (1, 4):
        with pytest.raises(DataError, match=r"part-1\.parquet: row 200: label 7"):
            encode(raw, tmp_path / f"out{workers}", workers=workers)
        assert not (tmp_path / f"out{workers}").exists()


def test_pieces_cover_every_row_in_stream_order(tmp_path):
    raw = raw_files(tmp_path)
    files = sorted(raw.glob("*.parquet"))
    pieces = plan_pieces(files, pq.ParquetFile)
    total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    assert sum(p.rows for p in pieces) == total
    assert [p.stream_row for p in pieces] == list(np.cumsum([0] + [p.rows for p in pieces])[:-1])
    assert all(p.file_row == 0 for p in pieces if p.row_group == 0)


def test_runner_keeps_order_and_bounds_work_in_flight():
    started = []

    def work(ctx, item):
        started.append(item)
        return ctx * item

    with Runner(workers=3) as r:
        it = r.map(work, 10, range(100))
        assert [next(it) for _ in range(5)] == [0, 10, 20, 30, 40]
        assert len(started) <= 5 + 3  # no more than the window ahead of the consumer
        assert list(it) == [10 * k for k in range(5, 100)]


def test_vocab_index_maps_ints_and_strings_with_oov_last():
    ints = VocabIndex(pa.array([30, 10, 20], pa.int64()))
    assert ints.ids(pa.array([10, None, 99, 30], pa.int64())).to_pylist() == [1, 3, 3, 0]
    strs = VocabIndex(pa.array(["b", "a"]))
    assert strs.ids(pa.array(["a", None, "zz"])).to_pylist() == [1, 2, 2]
    empty = VocabIndex(pa.array([], pa.int64()))
    assert empty.ids(pa.array([5, None], pa.int64())).to_pylist() == [0, 0]


def test_cli_workers_flag_and_bad_value(tmp_path):
    raw = raw_files(tmp_path, n_files=1)

    def cli(out, workers):
        return subprocess.run([sys.executable, "-c", "from embtables.pipelines.cli.main import main; "
                               "raise SystemExit(main())", "data", "parquet", str(raw), str(tmp_path / out),
                               "--label", "y", "--sparse", "i,s,m", "--dense", "x", "--workers", workers],
                              capture_output=True, text=True)

    ok = cli("o", "2")
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "o" / "stats.json").is_file()
    bad = cli("p", "0")
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:") and "workers" in bad.stderr


def test_cli_parquet_ingest_never_imports_torch(tmp_path):
    # torch + TorchRec would cost the command ~2.5 CPU seconds and ~0.5 GB of peak memory.
    raw = raw_files(tmp_path, n_files=1)
    code = ("import sys; from embtables.pipelines.cli.main import main; rc = main(); "
            "print(sorted(m for m in ('torch', 'torchrec', 'fbgemm_gpu') if m in sys.modules)); raise SystemExit(rc)")
    run = subprocess.run([sys.executable, "-c", code, "data", "parquet", str(raw), str(tmp_path / "o"),
                          "--label", "y", "--sparse", "i,s,m", "--dense", "x"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "o" / "stats.json").is_file()


@pytest.mark.slow  # starts a local Ray cluster
def test_ray_tasks_write_the_same_bytes(tmp_path):
    raw = raw_files(tmp_path)
    serial = files_of(encode(raw, tmp_path / "serial", workers=1))
    assert files_of(encode(raw, tmp_path / "ray", address="local", workers=2)) == serial


@pytest.mark.parametrize("cores,expected", [(1, 1), (2, 2), (3, 3), (16, 16)])
def test_default_workers_are_every_core(monkeypatch, cores, expected):
    from embtables.pipelines.data import ingest_plan

    monkeypatch.setattr(ingest_plan.os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert ingest_plan.default_workers() == expected
