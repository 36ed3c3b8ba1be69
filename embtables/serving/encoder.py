"""Rows of raw values (or checked ids) → a Batch: what serving needs to score a table.

Raw values go through the export's vocabularies (unseen → OOV); encoded ids and dense columns
through the same decoding as training (embtables/rows.py).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from embtables.arrow_sparse import flatten
from embtables.errors import DataError
from embtables.rows import Batch, checked_ids, dense_features, to_kjt


class RowEncoder:
    """Rows of a table → a Batch: raw values through the vocabularies, or checked ids."""

    def __init__(self, model, raw: bool):
        self.model, self.raw = model, raw
        self.meta = {f["name"]: f for f in model.manifest["features"]}

    def encode(self, table, where: str, row0: int = 0) -> Batch:
        if isinstance(table, dict):
            table = pa.table(table)
        for name in [*self.model.dense_names, *self.model.features]:
            _column(table, name, where)  # a missing column is named before anything is decoded
        dense = dense_features(table, self.model.dense_names, where, row0)
        ids = [self._ids(table.column(name), name, where, row0) for name in self.model.features]
        sparse = to_kjt(self.model.features, [v for v, _ in ids], [n for _, n in ids])
        label = None
        if self.model.label in table.column_names:
            label = table.column(self.model.label).to_numpy(zero_copy_only=False).astype(np.float64)
            bad = ~np.isin(label, (0.0, 1.0))
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise DataError(f"{where}: row {row0 + i}: label {label[i]!r} is not 0 or 1")
        return Batch(None if label is None else torch.from_numpy(label.astype(np.float32)), torch.from_numpy(dense),
                     sparse, table.num_rows)

    def _ids(self, col, name: str, where: str, row0: int) -> tuple[np.ndarray, np.ndarray]:
        meta = self.meta[name]
        try:
            flat, lengths = flatten(col)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise DataError(f"{where}: sparse column {name!r}: {e}") from None
        lengths = np.ones(len(col), dtype=np.int32) if lengths is None else lengths
        kind = "int64" if pa.types.is_integer(flat.type) else "string"
        expected = meta["value_type"] if self.raw else "int64"
        if kind != expected:
            raise DataError(f"{where}: sparse column {name!r} holds {kind} values but the export expects "
                            f"{expected} {'values' if self.raw else 'ids (encoded data)'}")
        if not self.raw:
            return checked_ids(flat, lengths, name, meta["rows"], where, row0), lengths
        # raw value → id; unseen and missing values → the OOV id
        filled = pc.fill_null(flat, 0 if kind == "int64" else "").to_numpy(zero_copy_only=False)
        ids = self.model.vocab_index(name).get_indexer(filled).astype(np.int64)
        ids[(ids < 0) | flat.is_null().to_numpy(zero_copy_only=False)] = meta["oov_id"]
        return ids, lengths

def _column(table, name: str, where: str):
    if name not in table.column_names:
        raise DataError(f"{where}: missing column {name!r}; available columns: {', '.join(table.column_names)}")
    return table.column(name)


