"""The batch reader: coverage across shards, resume, deterministic shuffle, contents, bad ids."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from embtables.errors import DataError
from embtables.pipelines.data.batches import iterate_batches
from embtables.pipelines.data.encode import load_stats, prepare_parquet

N = 1000


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """1000 train rows in row groups of 64; row r carries its index in dense column `rid`."""
    tmp = tmp_path_factory.mktemp("batches")
    r = np.arange(N)
    train = pa.table({
        "y": r % 2, "rid": r.astype(np.float64), "neg": -np.ones(N),
        "a": r % 7, "m": [[int(r_ % 5)] * int(r_ % 3) for r_ in r],
    })
    pq.write_table(train, tmp / "t.parquet")
    pq.write_table(train.slice(0, 10), tmp / "v.parquet")
    return prepare_parquet(tmp / "t.parquet", tmp / "v.parquet", label="y", dense=["rid", "neg"],
                           sparse=["a", "m"], out=tmp / "ds", row_group=64)


def row_ids(batches):
    """Row indices in stream order, checking each batch's label and sparse values against them."""
    out = []
    for b in batches:
        rid = np.rint(np.expm1(b.dense[:, 0].double().numpy())).astype(int)
        assert (b.label.numpy() == rid % 2).all()
        out += rid.tolist()
    return out


def test_batch_contents(dataset):
    stats = load_stats(dataset)
    vocab_a = pq.read_table(dataset / "vocab" / "a.parquet")["value"].to_pylist()
    vocab_m = pq.read_table(dataset / "vocab" / "m.parquet")["value"].to_pylist()
    batches = list(iterate_batches(dataset, "train", 128, shuffle=True, seed=3))
    assert [b.rows for b in batches] == [128] * 7 + [N - 7 * 128]  # last partial batch kept
    b = batches[0]
    assert b.label.dtype == torch.float32 and b.label.shape == (128,)
    assert b.dense.dtype == torch.float32 and b.dense.shape == (128, 2)
    assert (b.dense[:, 1] == 0).all()  # log1p(max(x, 0)) clamps negatives
    kjt = b.sparse
    assert kjt.keys() == stats["sparse"] and kjt.values().dtype == torch.int64 and kjt.stride() == 128
    rid = np.rint(np.expm1(b.dense[:, 0].double().numpy())).astype(int)
    a = kjt["a"]
    assert [vocab_a[i] for i in a.values().tolist()] == (rid % 7).tolist()
    m = kjt["m"]
    assert m.lengths().tolist() == (rid % 3).tolist()
    expected = [v for r in rid for v in [r % 5] * (r % 3)]
    assert [vocab_m[i] for i in m.values().tolist()] == expected


def test_unshuffled_is_file_order_and_drop_last(dataset):
    assert row_ids(iterate_batches(dataset, "train", 100, shuffle=False)) == list(range(N))
    sizes = [b.rows for b in iterate_batches(dataset, "train", 300, shuffle=False, drop_last=True)]
    assert sizes == [300, 300, 300]
    assert sum(b.rows for b in iterate_batches(dataset, "valid", 4, shuffle=False)) == 10


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7, 20])
@pytest.mark.parametrize("shuffle", [False, True])
def test_shards_cover_every_row_once(dataset, world, shuffle):
    seen = []
    for rank in range(world):
        seen += row_ids(iterate_batches(dataset, "train", 50, shuffle=shuffle, seed=1, epoch=2,
                                        shard=(rank, world)))
    assert sorted(seen) == list(range(N))


def test_shuffle_is_deterministic_and_changes_per_epoch(dataset):
    def order(seed, epoch):
        return row_ids(iterate_batches(dataset, "train", 64, shuffle=True, seed=seed, epoch=epoch))

    first = order(0, 0)
    assert first == order(0, 0)
    assert sorted(first) == list(range(N)) and first != list(range(N))
    assert order(0, 1) != first and order(1, 0) != first
    # Rows really mix across row groups, not only the row-group order.
    assert any(abs(a - b) > 64 for a, b in zip(first[:64], first[1:65]))


@pytest.mark.parametrize("shard", [(0, 1), (1, 3)])
@pytest.mark.parametrize("start", [0, 1, 63, 64, 255, 256, 257, 700])
def test_start_row_resumes_the_same_stream(dataset, shard, start):
    kw = dict(shuffle=True, seed=5, epoch=1, shard=shard)
    full = row_ids(iterate_batches(dataset, "train", 32, **kw))
    resumed = row_ids(iterate_batches(dataset, "train", 32, start_row=start, **kw))
    assert resumed == full[start:]


def _rewrite_part(src, dst, column, row, value):
    """Copy an encoded dataset, then set one id in its first train part file."""
    import shutil

    shutil.copytree(src, dst)
    part = dst / "train" / "part-00000.parquet"
    t = pq.read_table(part)
    ids = t[column].to_numpy().copy()
    ids[row] = value
    pq.write_table(t.set_column(t.schema.get_field_index(column), column, pa.array(ids)), part,
                   row_group_size=64)
    return dst


@pytest.mark.parametrize("value", [-1, 10 ** 6])
def test_out_of_range_id_names_file_column_row(dataset, tmp_path, value):
    bad = _rewrite_part(dataset, tmp_path / "bad", "a", 70, value)
    with pytest.raises(DataError) as e:
        list(iterate_batches(bad, "train", 32, shuffle=True))
    msg = str(e.value)
    assert "part-00000.parquet" in msg and "row 70" in msg and "'a'" in msg and str(value) in msg


def test_truncated_part_file_names_it(dataset, tmp_path):
    import shutil

    bad = tmp_path / "cut"
    shutil.copytree(dataset, bad)
    part = bad / "train" / "part-00000.parquet"
    part.write_bytes(part.read_bytes()[:500])
    with pytest.raises(DataError, match="part-00000.parquet"):
        list(iterate_batches(bad, "train", 32, shuffle=False))


@pytest.mark.parametrize("workers", [1, 2])
def test_a_relative_dataset_path_reads_the_same_rows(dataset, monkeypatch, workers):
    """`make demo` passes data/prepared/...: a relative dataset dir must not be joined twice."""
    expected = row_ids(iterate_batches(dataset, "train", 64, shuffle=False))
    monkeypatch.chdir(dataset.parent)
    got = row_ids(iterate_batches(dataset.name, "train", 64, shuffle=False, workers=workers))
    assert got == expected


def test_a_list_column_where_stats_say_single_hot_names_file_and_column(dataset, tmp_path):
    import shutil

    bad = tmp_path / "listed"
    shutil.copytree(dataset, bad)
    part = bad / "train" / "part-00000.parquet"
    t = pq.read_table(part)
    listed = pa.array([[int(v)] for v in t["a"].to_numpy()])
    pq.write_table(t.set_column(t.schema.get_field_index("a"), "a", listed), part, row_group_size=64)
    with pytest.raises(DataError, match=r"part-00000.parquet: column 'a' holds lists, but stats.json says"):
        list(iterate_batches(bad, "train", 32, shuffle=False))


def test_ids_of_tables_beyond_int32_read_the_same(dataset, tmp_path):
    """The reader keeps single-hot ids as int32 where every table fits, int64 otherwise: same batches."""
    import json
    import shutil

    wide = tmp_path / "wide"
    shutil.copytree(dataset, wide)
    stats = json.loads((wide / "stats.json").read_text())
    stats["features"]["a"]["rows"] = 2 ** 31 + 7
    (wide / "stats.json").write_text(json.dumps(stats))
    for narrow, wide_ in zip(iterate_batches(dataset, "train", 96, shuffle=True, seed=5),
                             iterate_batches(wide, "train", 96, shuffle=True, seed=5)):
        for x, y in ((narrow.label, wide_.label), (narrow.dense, wide_.dense),
                     (narrow.sparse.values(), wide_.sparse.values()), (narrow.sparse.offsets(), wide_.sparse.offsets())):
            assert torch.equal(x, y)
        assert narrow.sparse.values().dtype == torch.int64


def test_single_hot_batches_carry_offsets_and_per_key_lengths(tmp_path):
    """A single-hot-only dataset takes the one-block path: its KJT is complete as it leaves the reader."""
    r = np.arange(300)
    pq.write_table(pa.table({"y": r % 2, "x": r.astype(np.float64), "a": r % 7, "b": r % 11}), tmp_path / "t.parquet")
    ds = prepare_parquet(tmp_path / "t.parquet", None, label="y", dense=["x"], sparse=["a", "b"], out=tmp_path / "ds",
                         row_group=64)
    vocab = {k: pq.read_table(ds / "vocab" / f"{k}.parquet")["value"].to_pylist() for k in ("a", "b")}
    seen = []
    for batch in iterate_batches(ds, "train", 50, shuffle=True, seed=1):
        kjt = batch.sparse
        n = batch.rows
        assert kjt.offsets_or_none() is not None and kjt.offsets().tolist() == list(range(2 * n + 1))
        assert kjt.length_per_key() == [n, n] and kjt.lengths().tolist() == [1] * (2 * n)
        rid = np.rint(np.expm1(batch.dense[:, 0].double().numpy())).astype(int)
        assert [vocab["a"][i] for i in kjt["a"].values().tolist()] == (rid % 7).tolist()
        assert [vocab["b"][i] for i in kjt["b"].values().tolist()] == (rid % 11).tolist()
        seen += rid.tolist()
    assert len(set(seen)) == len(seen) == load_stats(ds)["splits"]["train"]["rows"] > 200  # 10% held out
