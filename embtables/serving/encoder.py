"""Rows of raw values (or checked ids) → model inputs: dense features and a raw-id KJT.

What serving needs to score a table: each sparse column flattened (lists give multi-hot
lengths), raw values mapped through the export's vocabularies (unseen → OOV), dense columns
through the training transform.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torchrec import KeyedJaggedTensor

from embtables.errors import DataError


def flatten(col: pa.Array) -> tuple[pa.Array, np.ndarray | None]:
    """Sparse column → (flat values as int64 or string, per-row lengths for lists, else None).

    A null list counts as an empty list; a null value (single or inside a list) stays null
    and later becomes the OOV id.
    """
    lengths = None
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy().astype(np.int64)
        col = pc.list_flatten(col)
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    target = pa.int64() if pa.types.is_integer(col.type) else pa.string()
    return col.cast(target), lengths



@dataclass
class Encoded:
    dense: torch.Tensor           # [B, n_dense] float32, log1p(max(x, 0))
    sparse: KeyedJaggedTensor     # ids per feature, in the model's feature order
    label: np.ndarray | None
    rows: int


class RowEncoder:
    """Rows of a table → model inputs: raw values through the vocabularies, or checked ids."""

    def __init__(self, model, raw: bool):
        self.model, self.raw = model, raw
        self.meta = {f["name"]: f for f in model.manifest["features"]}

    def encode(self, table, where: str, row0: int = 0) -> Encoded:
        if isinstance(table, dict):
            table = pa.table(table)
        n = table.num_rows
        dense = np.zeros((n, len(self.model.dense_names)), dtype=np.float32)
        for j, name in enumerate(self.model.dense_names):
            column = _column(table, name, where)
            x = column.cast(pa.float32())
            x = pc.fill_null(pc.if_else(pc.fill_null(pc.is_nan(x), False), 0.0, x), 0.0).to_numpy()
            bad = np.isinf(x)  # inf, or beyond float32 (the model's dense type) and so inf after the cast
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise DataError(f"{where}: row {row0 + i}: dense column {name!r} is {column[i].as_py()}, "
                                f"inf or beyond float32")
            dense[:, j] = np.log1p(np.maximum(x, 0.0))  # the training transform (pipelines/data/batches.py)
        values, lengths = [], []
        for name in self.model.features:
            ids, lens = self._ids(_column(table, name, where), name, where, row0)
            values.append(ids)
            lengths.append(lens)
        sparse = KeyedJaggedTensor(keys=list(self.model.features), values=torch.from_numpy(np.concatenate(values)),
                                   lengths=torch.from_numpy(np.concatenate(lengths)))
        label = None
        if self.model.label in table.column_names:
            label = table.column(self.model.label).to_numpy(zero_copy_only=False).astype(np.float64)
            bad = ~np.isin(label, (0.0, 1.0))
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise DataError(f"{where}: row {row0 + i}: label {label[i]!r} is not 0 or 1")
        return Encoded(torch.from_numpy(dense), sparse, label, n)

    def _ids(self, col, name: str, where: str, row0: int) -> tuple[np.ndarray, np.ndarray]:
        meta = self.meta[name]
        try:
            flat, lengths = flatten(col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise DataError(f"{where}: sparse column {name!r}: {e}") from None
        lengths = np.ones(len(col), dtype=np.int64) if lengths is None else lengths
        kind = "int64" if pa.types.is_integer(flat.type) else "string"
        expected = meta["value_type"] if self.raw else "int64"
        if kind != expected:
            raise DataError(f"{where}: sparse column {name!r} holds {kind} values but the export expects "
                            f"{expected} {'values' if self.raw else 'ids (encoded data)'}")
        nulls = flat.is_null().to_numpy(zero_copy_only=False)
        if self.raw:  # raw value → id; unseen and missing values → the OOV id
            filled = pc.fill_null(flat, 0 if kind == "int64" else "").to_numpy(zero_copy_only=False)
            ids = self.model.vocab_index(name).get_indexer(filled).astype(np.int64)
            ids[(ids < 0) | nulls] = meta["oov_id"]
            return ids, lengths
        ids = pc.fill_null(flat, -1).to_numpy().astype(np.int64)
        bad = (ids < 0) | (ids >= meta["rows"])
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            i = int(np.searchsorted(np.cumsum(lengths), j, side="right"))
            raise DataError(f"{where}: row {row0 + i}: column {name!r} has id {flat[j].as_py()}, "
                            f"outside [0, {meta['rows']})")
        return ids, lengths


def _column(table, name: str, where: str):
    if name not in table.column_names:
        raise DataError(f"{where}: missing column {name!r}; available columns: {', '.join(table.column_names)}")
    return table.column(name)


