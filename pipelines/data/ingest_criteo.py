"""Criteo click logs → encoded dataset.

Two layouts: the raw `train.txt` (tab-separated, no header, optionally .gz) and the CSV with a
`label,I1..I13,C1..C26` header (data/samples/criteo_sample.txt). The file is streamed, so the
45M-row original never sits in memory.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from embtables.errors import DataError
from embtables.pipelines.data.parquet_io import CsvStream, PartWriter, read_first_line, scratch_dir
from embtables.pipelines.data.encode import BEYOND_FLOAT32, check_target, dense_in_range, prepare_parquet

LABEL = "label"
DENSE = [f"I{i}" for i in range(1, 14)]
SPARSE = [f"C{i}" for i in range(1, 27)]
NAMES = [LABEL] + DENSE + SPARSE
# Counts may be written as "260.0" in the CSV layout, so read them as floats; empty = missing.
TYPES = {LABEL: pa.int64(), **{d: pa.float64() for d in DENSE}, **{c: pa.string() for c in SPARSE}}


def detect_layout(raw: Path) -> tuple[str, bool]:
    """(delimiter, has_header) from the first line."""
    first = read_first_line(raw)
    if first.split(",") == NAMES:
        return ",", True
    if "\t" in first:
        return "\t", False
    raise DataError(f"{raw}: line 1: not a Criteo file (expected tab-separated fields or the header "
                    f"{','.join(NAMES[:3])},...,C26), got {first[:80]!r}")


def ingest(raw, out, *, valid_fraction: float = 0.1, seed: int = 0, min_count: int = 1,
           max_rows: int | None = None) -> Path:
    """Convert a Criteo file to plain Parquet beside `out`, then encode it into `out`."""
    raw = Path(raw)
    check_target(out, valid_fraction)
    delimiter, header = detect_layout(raw)
    with scratch_dir(out, "raw") as tmp:
        writer = PartWriter(tmp, pa.schema(list(TYPES.items())))
        stream = CsvStream(raw, names=NAMES, types=TYPES, delimiter=delimiter, header=header)
        for rows, batch in stream.batches(max_rows):
            stream.require_binary(batch, LABEL, rows)
            for name in DENSE:
                stream.require(batch, name, dense_in_range(batch.column(name)), rows, "is " + BEYOND_FLOAT32)
            writer.write(pa.Table.from_batches([batch]))
        writer.close()
        return prepare_parquet(tmp, None, label=LABEL, dense=DENSE, sparse=SPARSE, out=out,
                               min_count=min_count, source="criteo",
                               valid_fraction=valid_fraction, seed=seed, origin=raw)
