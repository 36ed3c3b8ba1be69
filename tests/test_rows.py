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


@pytest.mark.parametrize("column, bad", [(pa.array([[1], [2, 9]]), "has id 9"), (pa.array([1, None]), "has id None")])
def test_bad_ids_name_the_row(column, bad):
    with pytest.raises(DataError, match=rf"t: row 101: column 'c' {bad}, outside \[0, 4\)"):
        sparse_ids(column, "c", 4, "t", row0=100)
