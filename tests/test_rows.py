"""The one row decoding (embtables/rows.py) that training and serving share."""
import numpy as np
import pyarrow as pa
import pytest

from embtables.errors import DataError
from embtables.rows import dense_features, sparse_ids, to_kjt


def test_the_dense_transform_and_its_nan_policy():
    table = pa.table({"a": pa.array([1.0, None, float("nan"), -5.0, np.e - 1]), "b": pa.array([0, 3, None, 7, 1])})
    got = dense_features(table, ["a", "b"], "t.parquet")
    expected = np.log1p(np.array([[1, 0], [0, 3], [0, 0], [0, 7], [np.e - 1, 1]], dtype=np.float32))
    assert got.dtype == np.float32 and np.allclose(got, expected)
    assert dense_features(table, [], "t.parquet").shape == (5, 0)


@pytest.mark.parametrize("value", [float("inf"), 1e39])  # 1e39 is beyond float32
def test_infinite_dense_values_name_the_row_and_column(value):
    table = pa.table({"a": pa.array([1.0, 2.0, value])})
    with pytest.raises(DataError, match=r"t.parquet: row 12: dense column 'a'"):
        dense_features(table, ["a"], "t.parquet", row0=10)


def test_sparse_ids_of_single_and_multi_hot_columns():
    ids, lengths = sparse_ids(pa.chunked_array([[3, 0], [2]]), "c", 4, "t")
    assert ids.tolist() == [3, 0, 2] and lengths.tolist() == [1, 1, 1]
    ids, lengths = sparse_ids(pa.array([[1, 2], None, [3]]), "m", 4, "t")
    assert ids.tolist() == [1, 2, 3] and lengths.tolist() == [2, 0, 1]
    kjt = to_kjt(["m"], [ids], [lengths])
    assert kjt.keys() == ["m"] and kjt.values().tolist() == [1, 2, 3] and kjt.lengths().tolist() == [2, 0, 1]


def test_to_kjt_carries_offsets_and_per_key_lengths():
    """Filled in by the reader, so ordering and splitting the KJT compute nothing again."""
    kjt = to_kjt(["s", "m"], [np.array([3, 0, 2]), np.array([1, 2, 3, 0])],
                 [np.ones(3, np.int32), np.array([2, 0, 2], np.int32)])
    assert kjt.offsets_or_none().tolist() == [0, 1, 2, 3, 5, 5, 7]
    assert kjt.length_per_key() == [3, 4] and kjt.offset_per_key() == [0, 3, 7] and kjt.stride() == 3
    assert kjt["m"].values().tolist() == [1, 2, 3, 0] and kjt["m"].lengths().tolist() == [2, 0, 2]
    empty = to_kjt([], [], [])
    assert empty.keys() == [] and empty.values().numel() == 0


def test_string_ids_in_an_encoded_column_are_a_data_error():
    with pytest.raises(DataError, match=r"t: column 'c' holds string values, not encoded int ids"):
        sparse_ids(pa.array(["a", "b"]), "c", 4, "t")


@pytest.mark.parametrize("column, bad", [(pa.array([[1], [2, 9]]), "has id 9"), (pa.array([1, None]), "has id None"),
                                         (pa.array([1, -3]), "has id -3")])
def test_bad_ids_name_the_row(column, bad):
    with pytest.raises(DataError, match=rf"t: row 101: column 'c' {bad}, outside \[0, 4\)"):
        sparse_ids(column, "c", 4, "t", row0=100)
