"""The stats pass and encoder: vocab order, OOV, min_count, multi-hot, bad input, atomicity."""
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embtables.errors import ConfigError, DataError
from embtables.pipelines.data import prepared
from embtables.pipelines.data import encode as stats
from embtables.pipelines.data.encode import feature_specs, load_stats, prepare_parquet


def write(path, columns, **kw):
    pq.write_table(pa.table(columns), path, **kw)
    return path


def vocab(out, name):
    return pq.read_table(out / "vocab" / f"{name}.parquet").to_pydict()


def encoded(out, split):
    return pq.read_table(out / split).to_pydict()


def leftovers(tmp_path, keep):
    """Everything in tmp_path except the given input files (catches temp dirs left behind)."""
    return sorted(p.name for p in tmp_path.iterdir() if p.name not in keep)


def test_vocab_is_frequency_ordered_with_oov_last(tmp_path):
    train = write(tmp_path / "t.parquet", {
        "y": [0, 1, 0, 1, 1, 0, 0],
        "x": [1.5, None, 2.0, float("nan"), 0.0, 3.0, -1.0],
        "a": [30, 10, 10, 20, 30, 10, None],      # 10 ×3, then the 30/20 tie... 30 ×2, 20 ×1
        "s": ["b", "a", "b", "a", "c", "c", "d"],  # three-way tie a/b/c ×2 → by value
    })
    valid = write(tmp_path / "v.parquet", {"y": [1, 0], "x": [1.0, 2.0], "a": [20, 99], "s": ["zz", "a"]})
    out = prepare_parquet(train, valid, label="y", dense=["x"], sparse=["a", "s"], out=tmp_path / "ds")

    assert vocab(out, "a") == {"value": [10, 30, 20], "count": [3, 2, 1]}
    assert vocab(out, "s") == {"value": ["a", "b", "c", "d"], "count": [2, 2, 2, 1]}
    t, v = encoded(out, "train"), encoded(out, "valid")
    assert t["a"] == [1, 0, 0, 2, 1, 0, 3]                 # null → OOV id 3
    assert t["s"] == [1, 0, 1, 0, 2, 2, 3]
    assert t["x"] == [1.5, 0.0, 2.0, 0.0, 0.0, 3.0, -1.0]  # nulls/NaN → 0, no transform
    assert t["y"] == [0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    assert v["a"] == [2, 3] and v["s"] == [4, 0]           # unseen in train → OOV
    s = load_stats(out)
    fa = s["features"]["a"]
    assert (fa["vocab_size"], fa["rows"], fa["oov_id"], fa["value_type"]) == (3, 4, 3, "int64")
    assert (fa["oov_count_train"], fa["oov_count_valid"]) == (1, 1)
    assert s["features"]["s"]["value_type"] == "string"
    assert s["splits"]["train"]["rows"] == 7 and s["splits"]["valid"]["files"] == ["valid/part-00000.parquet"]
    schema = pq.read_schema(out / "train" / "part-00000.parquet")
    assert schema.field("y").type == pa.float32() and schema.field("a").type == pa.int64()
    assert leftovers(tmp_path, {"t.parquet", "v.parquet"}) == ["ds"]


def test_min_count_sends_rare_values_to_oov(tmp_path):
    train = write(tmp_path / "t.parquet", {"y": [0, 1, 0, 1, 0], "a": [5, 5, 5, 6, 7]})
    out = prepare_parquet(train, train, label="y", dense=[], sparse=["a"], out=tmp_path / "ds", min_count=2)
    assert vocab(out, "a") == {"value": [5], "count": [3]}
    assert encoded(out, "train")["a"] == [0, 0, 0, 1, 1]
    f = load_stats(out)["features"]["a"]
    assert f["oov_count_train"] == 2 and f["min_count"] == 2
    spec = feature_specs(out)[0]
    assert spec.rows == 2 and spec.counts.tolist() == [3, 2]


def test_multi_hot_round_trip(tmp_path):
    lists = [["x", "y"], ["y"], None, [], ["y", "z", None], ["x"]]
    train = write(tmp_path / "t.parquet", {"y": [0, 1, 1, 0, 1, 0], "g": lists})
    valid = write(tmp_path / "v.parquet", {"y": [1, 0], "g": [["new", "x"], ["y"]]})
    out = prepare_parquet(train, valid, label="y", dense=[], sparse=["g"], out=tmp_path / "ds")
    values = vocab(out, "g")["value"]
    assert values == ["y", "x", "z"]
    oov = len(values)
    decoded = [[values[i] if i < oov else None for i in row] for row in encoded(out, "train")["g"]]
    assert decoded == [["x", "y"], ["y"], [], [], ["y", "z", None], ["x"]]  # null list → []
    assert encoded(out, "valid")["g"] == [[oov, 1], [0]]
    f = load_stats(out)["features"]["g"]
    assert f["multi_hot"] and f["max_length"] == 3 and f["mean_length"] == pytest.approx(7 / 6)
    assert (f["oov_count_train"], f["oov_count_valid"]) == (1, 1)


def test_stats_pass_in_tiny_batches_gives_the_same_vocab(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    n = 3000
    cols = {"y": rng.integers(0, 2, n), "a": rng.zipf(1.5, n) % 500,
            "s": [f"v{k}" for k in rng.integers(0, 300, n)],
            "m": [[int(v) for v in rng.integers(0, 50, k)] for k in rng.integers(0, 4, n)]}
    train = write(tmp_path / "t.parquet", cols, row_group_size=97)
    whole = prepare_parquet(train, None, label="y", dense=[], sparse=["a", "s", "m"], out=tmp_path / "one")

    # Tiny read batches and a tiny merge threshold force many incremental merges: group-bys of
    # the string counts, sorted-run merges of the integer ones.
    merges, run_merges = [], []
    compact, merge_runs = stats.ValueCounter._compact, stats.merge_runs
    monkeypatch.setattr(stats, "STATS_BATCH_ROWS", 50)
    monkeypatch.setattr(stats, "COMPACT_MIN_ROWS", 64)
    monkeypatch.setattr(stats.ValueCounter, "_compact", lambda self: (merges.append(1), compact(self))[1])
    monkeypatch.setattr(stats, "merge_runs", lambda a, b: (run_merges.append(1), merge_runs(a, b))[1])
    streamed = prepare_parquet(train, None, label="y", dense=[], sparse=["a", "s", "m"], out=tmp_path / "many")
    assert len(merges) > 5 and len(run_merges) > 100
    for name in ("a", "s", "m"):
        assert vocab(whole, name) == vocab(streamed, name)
    assert encoded(whole, "train") == encoded(streamed, "train")


def test_id_counter_counts_like_a_plain_count(monkeypatch):
    rng = np.random.default_rng(3)
    counter, expected = stats.IdCounter(), {}
    for _ in range(40):  # runs of uneven sizes: merges of every size ratio
        values = rng.zipf(1.3, int(rng.integers(1, 400))) * 1_000_003 % (1 << 40)
        for v in values.tolist():
            expected[v] = expected.get(v, 0) + 1
        counter.add_counts(stats.count_values(pa.array(values)))
    counter.add_counts(stats.count_values(pa.array([None], pa.int64())))  # nothing to count
    got = counter.vocab(min_count=2, value_type="int64").to_pydict()
    want = sorted(((-c, v) for v, c in expected.items() if c >= 2))
    assert list(zip(got["value"], got["count"])) == [(v, -c) for c, v in want]
    assert len(got["value"]) > 20 and len(set(got["count"])) < len(got["count"])  # ties, broken by value
    assert stats.IdCounter().vocab(1, "int64").num_rows == 0


def test_random_split_is_seeded_and_counts_train_only(tmp_path):
    n = 2000
    train = write(tmp_path / "t.parquet", {"y": np.arange(n) % 2, "a": np.arange(n) % 37, "r": np.arange(n)})
    a = prepare_parquet(train, None, label="y", dense=["r"], sparse=["a"], out=tmp_path / "a", seed=1)
    b = prepare_parquet(train, None, label="y", dense=["r"], sparse=["a"], out=tmp_path / "b", seed=1)
    c = prepare_parquet(train, None, label="y", dense=["r"], sparse=["a"], out=tmp_path / "c", seed=2)
    ra, rb, rc = (sorted(encoded(d, "valid")["r"]) for d in (a, b, c))
    assert ra == rb and ra != rc
    assert 0.05 * n < len(ra) < 0.15 * n
    assert sorted(ra + encoded(a, "train")["r"]) == list(range(n))
    s = load_stats(a)
    assert sum(vocab(a, "a")["count"]) == s["splits"]["train"]["rows"]  # counts from train rows only


def test_feature_specs_counts_end_with_oov(tmp_path):
    train = write(tmp_path / "t.parquet", {"y": [0, 1, 0], "a": [1, 1, None], "m": [[1, 2], [2], [2]]})
    out = prepare_parquet(train, train, label="y", dense=[], sparse=["a", "m"], out=tmp_path / "ds")
    a, m = feature_specs(out)
    assert (a.name, a.rows, a.oov_id, a.counts.tolist()) == ("a", 2, 1, [2, 1])
    assert m.multi_hot and m.counts.tolist() == [3, 1, 0] and m.mean_length == pytest.approx(4 / 3)


BAD_CASES = [
    ("label NaN", {"y": [0.0, 1.0, float("nan")], "a": [1, 2, 3]}, ["row 2", "label", "nan"]),
    ("label 2", {"y": [0, 1, 0, 2], "a": [1, 2, 3, 4]}, ["row 3", "label", "2"]),
    ("label null", {"y": [0, None], "a": [1, 2]}, ["row 1", "label", "None"]),
    ("negative id", {"y": [0, 1, 0], "a": [1, -5, 3]}, ["row 1", "'a'", "-5"]),
    ("negative in list", {"y": [0, 1, 0], "a": [1, 2, 3], "m": [[1], [2, 3], [4, -1]]}, ["row 2", "'m'"]),
    ("float sparse", {"y": [0, 1], "a": [1.5, 2.0]}, ["'a'", "double"]),
    ("string label", {"y": ["0", "1"], "a": [1, 2]}, ["'y'", "label"]),
    ("string dense", {"y": [0, 1], "a": [1, 2], "x": ["1", "2"]}, ["'x'", "dense"]),
    ("dense inf", {"y": [0, 1], "a": [1, 2], "x": [1.0, float("inf")]}, ["row 1", "'x'"]),
    ("missing column", {"y": [0, 1], "b": [1, 2]}, ["'a'", "available", "b"]),
]


@pytest.mark.parametrize("case,columns,expected", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_names_file_and_row(tmp_path, case, columns, expected):
    path = write(tmp_path / "bad_input.parquet", columns)
    dense = ["x"] if "x" in columns else []
    sparse = ["a", "m"] if "m" in columns else ["a"]
    with pytest.raises(DataError) as e:
        prepare_parquet(path, None, label="y", dense=dense, sparse=sparse, out=tmp_path / "ds")
    msg = str(e.value)
    assert "bad_input.parquet" in msg
    for part in expected:
        assert part in msg
    assert leftovers(tmp_path, {"bad_input.parquet"}) == []


def test_bad_valid_file_fails_after_train_pass_and_leaves_nothing(tmp_path):
    train = write(tmp_path / "t.parquet", {"y": [0, 1], "a": [1, 2]})
    valid = write(tmp_path / "v.parquet", {"y": [0, 1, 7], "a": [1, 2, 3]})
    with pytest.raises(DataError, match=r"v\.parquet: row 2: label 7"):
        prepare_parquet(train, valid, label="y", dense=[], sparse=["a"], out=tmp_path / "ds")
    assert leftovers(tmp_path, {"t.parquet", "v.parquet"}) == []


def test_sparse_kind_must_agree_across_files(tmp_path):
    write(tmp_path / "p0.parquet", {"y": [0, 1], "a": [1, 2]})
    write(tmp_path / "p1.parquet", {"y": [0, 1], "a": ["x", "y"]})
    with pytest.raises(DataError, match=r"p1\.parquet: sparse column 'a' holds string"):
        prepare_parquet(str(tmp_path / "p*.parquet"), None, label="y", dense=[], sparse=["a"], out=tmp_path / "ds")


def test_truncated_and_empty_parquet(tmp_path):
    good = write(tmp_path / "cut.parquet", {"y": list(range(2)) * 500, "a": list(range(1000))})
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.parquet"):
        prepare_parquet(good, None, label="y", dense=[], sparse=["a"], out=tmp_path / "ds")
    empty = write(tmp_path / "empty.parquet", {"y": pa.array([], pa.int64()), "a": pa.array([], pa.int64())})
    with pytest.raises(DataError, match="empty.parquet: Parquet file has 0 rows"):
        prepare_parquet(empty, None, label="y", dense=[], sparse=["a"], out=tmp_path / "ds")
    assert leftovers(tmp_path, {"cut.parquet", "empty.parquet"}) == []


def test_output_replaces_a_dataset_but_not_other_dirs(tmp_path):
    train = write(tmp_path / "t.parquet", {"y": [0, 1], "a": [1, 2]})
    out = prepare_parquet(train, train, label="y", dense=[], sparse=["a"], out=tmp_path / "ds")
    prepare_parquet(train, train, label="y", dense=[], sparse=["a"], out=out, min_count=2)
    assert load_stats(out)["features"]["a"]["min_count"] == 2
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="refusing to overwrite"):
        prepare_parquet(train, train, label="y", dense=[], sparse=["a"], out=other)
    assert (other / "keep.txt").read_text() == "mine"
    assert leftovers(tmp_path, {"t.parquet"}) == ["ds", "notes"]


def test_config_errors(tmp_path):
    train = write(tmp_path / "t.parquet", {"y": [0, 1], "a": [1, 2]})
    with pytest.raises(ConfigError, match="used twice"):
        prepare_parquet(train, None, label="y", dense=["a"], sparse=["a"], out=tmp_path / "ds")
    with pytest.raises(DataError, match="nothing_here"):
        prepare_parquet(tmp_path / "nothing_here", None, label="y", dense=[], sparse=["a"], out=tmp_path / "ds")
    with pytest.raises(DataError, match="not found"):
        load_stats(tmp_path)


def test_ensure_encoded_caches_and_reuses(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBTABLES_CACHE", str(tmp_path / "cache"))
    train = write(tmp_path / "t.parquet", {"y": [0, 1, 1, 0] * 10, "a": list(range(40))})
    first = prepared.ensure_encoded(train, None, "y", [], ["a"])
    assert first.parent == tmp_path / "cache" and (first / "stats.json").is_file()
    stamp = os.stat(first / "stats.json").st_mtime_ns
    again = prepared.ensure_encoded(str(train), None, "y", [], ["a"])
    assert again == first and os.stat(first / "stats.json").st_mtime_ns == stamp
    other = prepared.ensure_encoded(train, None, "y", [], ["a"], min_count=2)
    assert other != first

    # An encoded dataset (or a split inside it) is used as is.
    assert prepared.ensure_encoded(first / "train", None, "y", [], ["a"]) == first
    assert prepared.ensure_encoded(str(first), None, "y", [], []) == first
    with pytest.raises(ConfigError, match="nope"):
        prepared.ensure_encoded(first, None, "y", [], ["a", "nope"])


def test_stats_json_layout(tmp_path):
    train = write(tmp_path / "t.parquet", {"y": [0, 1], "x": [1, 2], "a": [1, 2]})
    out = prepare_parquet(train, train, label="y", dense=["x"], sparse=["a"], out=tmp_path / "ds",
                          source="synth", extra_stats={"planted": {"valid_auc": 0.8}})
    s = json.loads((out / "stats.json").read_text())
    assert s["format"] == "embtables-encoded" and s["version"] == 1 and s["source"] == "synth"
    assert (s["label"], s["dense"], s["sparse"]) == ("y", ["x"], ["a"])
    assert s["planted"] == {"valid_auc": 0.8}
    assert set(s["features"]["a"]) >= {"vocab_size", "rows", "oov_id", "multi_hot", "mean_length", "max_length",
                                       "min_count", "value_type", "oov_count_train", "oov_count_valid"}
