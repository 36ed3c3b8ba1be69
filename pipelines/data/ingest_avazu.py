"""Avazu click logs (Kaggle CSV with header) → encoded dataset.

label = click; `id` is dropped; every other column is a sparse string feature, and the
`hour` stamp (YYMMDDHH) also yields `hour_of_day` and `weekday` (Monday = 0).
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from embtables.errors import DataError
from embtables.pipelines.data.parquet_io import CsvStream, PartWriter, read_first_line, scratch_dir
from embtables.pipelines.data.encode import check_target, prepare_parquet

LABEL = "click"
DERIVED = ["hour_of_day", "weekday"]


def ingest(raw, out, *, valid_fraction: float = 0.1, seed: int = 0, min_count: int = 1,
           max_rows: int | None = None) -> Path:
    """Convert an Avazu CSV to plain Parquet beside `out`, then encode it into `out`."""
    raw = Path(raw)
    check_target(out, valid_fraction)
    names = read_first_line(raw).split(",")
    missing = [c for c in ("id", LABEL, "hour") if c not in names]
    if missing:
        raise DataError(f"{raw}: line 1: header lacks {', '.join(missing)}; got {','.join(names)[:200]}")
    sparse = [c for c in names if c not in ("id", LABEL)] + DERIVED
    types = {c: pa.string() for c in names}
    types[LABEL] = pa.int64()
    schema = pa.schema([(LABEL, pa.int64())] + [(c, pa.string()) for c in sparse[:-2]]
                       + [(c, pa.int64()) for c in DERIVED])
    with scratch_dir(out, "raw") as tmp:
        writer = PartWriter(tmp, schema)
        stream = CsvStream(raw, names=names, types=types, delimiter=",", header=True)
        for rows, batch in stream.batches(max_rows):
            stream.require_binary(batch, LABEL, rows)
            stamp = pc.strptime(batch.column("hour"), format="%y%m%d%H", unit="s", error_is_null=True)
            stream.require(batch, "hour", pc.is_valid(stamp).to_numpy(zero_copy_only=False), rows,
                           "is not a YYMMDDHH time")
            cols = {c: batch.column(c) for c in [LABEL] + sparse[:-2]}
            cols["hour_of_day"] = pc.hour(stamp).cast(pa.int64())
            cols["weekday"] = pc.day_of_week(stamp).cast(pa.int64())
            writer.write(pa.table(cols, schema=schema))
        writer.close()
        return prepare_parquet(tmp, None, label=LABEL, dense=[], sparse=sparse, out=out,
                               min_count=min_count, source="avazu",
                               valid_fraction=valid_fraction, seed=seed, origin=raw)
