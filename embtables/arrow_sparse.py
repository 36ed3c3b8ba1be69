"""Sparse Arrow columns as flat values, without torch: the ingest imports only this, not rows.py
(importing torch and TorchRec costs the `data` commands ~2.5 CPU seconds and ~0.5 GB of memory)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def flatten(col: pa.Array) -> tuple[pa.Array, np.ndarray | None]:
    """Sparse column → (flat values as int64 or string, per-row lengths for lists, else None).

    A null list counts as an empty list; a null value (single or inside a list) stays null.
    """
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    lengths = None
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy().astype(np.int32)
        col = pc.list_flatten(col)
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    target = pa.int64() if pa.types.is_integer(col.type) else pa.string()
    return col.cast(target), lengths
