"""File I/O with clear errors: atomic outputs, checked Parquet reads, streamed CSV reads.

Every output is built beside its final place and renamed in at the end, so a crash never
leaves something half-written that looks complete. Every read failure becomes a `DataError`
that names the file (and the line, row or column when known).
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from embtables.atomic import atomic_dir, clean_stale, remove, temp_sibling
from embtables.errors import DataError

ENCODED_FORMAT = "embtables-encoded"
ROW_GROUP_ROWS = 65536
FILE_ROWS = 16 * ROW_GROUP_ROWS  # ~1M rows per part file


# ---------------------------------------------------------------- atomic outputs

def is_encoded_dataset(path: str | Path) -> bool:
    stats = Path(path) / "stats.json"
    if not stats.is_file():
        return False
    try:
        return json.loads(stats.read_text()).get("format") == ENCODED_FORMAT
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def scratch_dir(beside: str | Path, tag: str) -> Iterator[Path]:
    """A temp dir next to `beside` (same filesystem), always removed afterwards."""
    beside = Path(beside)
    clean_stale(beside)
    beside.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(beside, tag)
    tmp.mkdir()
    try:
        yield tmp
    finally:
        remove(tmp)


@contextlib.contextmanager
def dataset_dir(out: str | Path, *, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a sibling temp dir that becomes the encoded dataset `out` when complete.

    A previous encoded dataset at `out` is replaced (never an unrelated non-empty directory,
    and never one a running job is reading: see identity.reading_dataset); with
    `keep_existing` (caches, where a concurrent builder may have finished first) it is kept
    and the new build dropped.
    """
    from embtables.pipelines.data.identity import no_readers

    try:
        with atomic_dir(out, replaceable=is_encoded_dataset, keep_existing=keep_existing, guard=no_readers,
                        what="an encoded dataset") as tmp:
            yield tmp
    except FileExistsError as e:
        raise DataError(str(e)) from None


# ---------------------------------------------------------------- Parquet reads

def expand_paths(paths) -> list[Path]:
    """Files, directories (all *.parquet inside, sorted) or globs → a sorted list of files."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    for p in paths:
        p = str(p)
        if os.path.isdir(p):
            # Skip hidden and "_"-prefixed entries (temp dirs, Spark/Hive metadata files).
            found = sorted(f for f in Path(p).rglob("*.parquet")
                           if not any(part[0] in "._" for part in f.relative_to(p).parts))
            if not found:
                raise DataError(f"{p}: directory holds no *.parquet files")
            files += found
        elif os.path.isfile(p):
            files.append(Path(p))
        else:
            found = sorted(Path(m) for m in glob.glob(p) if os.path.isfile(m))
            if not found:
                raise DataError(f"{p}: no such file, directory or matching glob")
            files += found
    if not files:
        raise DataError("no input files given")
    return files


def open_parquet(path: str | Path, columns: list[str] | None = None) -> pq.ParquetFile:
    """Open a Parquet file; corrupt, empty or missing-column files raise a DataError naming it."""
    path = Path(path)
    try:
        pf = pq.ParquetFile(path, memory_map=True)  # decoding reads the pages in place: no copy of them first
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file (truncated or corrupt?): {e}") from None
    if pf.metadata.num_rows == 0:
        raise DataError(f"{path}: Parquet file has 0 rows")
    if columns:
        have = pf.schema_arrow.names
        for c in columns:
            if c not in have:
                raise DataError(f"{path}: missing column {c!r}; available columns: {', '.join(have)}")
    return pf


def read_row_group(pf: pq.ParquetFile, path: Path, index: int, columns: list[str]) -> pa.Table:
    """One row group; a corrupt page raises a DataError naming the file and row group."""
    try:
        return pf.read_row_group(index, columns=columns)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: row group {index} is unreadable (truncated or corrupt?): {e}") from None


def iter_batches(pf: pq.ParquetFile, path: Path, columns: list[str], batch_rows: int,
                 row_groups: list[int] | None = None, use_threads: bool = True) -> Iterator[pa.RecordBatch]:
    """Stream record batches of one file (or of some of its row groups), mapping read failures
    to a DataError naming it."""
    it = pf.iter_batches(batch_size=batch_rows, columns=columns, row_groups=row_groups, use_threads=use_threads)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: unreadable Parquet data (truncated or corrupt?): {e}") from None
        yield batch


# ---------------------------------------------------------------- Parquet writes

def page_options(schema: pa.Schema) -> dict:
    """ParquetWriter options: integer columns (ids, or lists of them) delta-bit-packed and not
    compressed, float columns byte-stream-split + LZ4, anything else plain + snappy; no
    dictionary pages anywhere.

    Ids are a dense, frequency-ordered code, so a dictionary only costs time and bytes. On the
    4M-row benchmark's encoded files (1M rows, 26 id + 14 float columns), delta-bit-packed ids
    against plain + snappy: write 0.29 vs 0.47 CPU s, read 0.10 vs 0.31 CPU s, 96 vs 132 MB
    (snappy on bit-packed ids saves 0.2%; snappy was a ninth of the whole ingest's CPU time).
    Floats (the label and the dense counts), on a 65k-row group of synth criteo26: plain +
    snappy 3.9 ms to decode (2 threads), byte-stream-split + LZ4 0.85 ms, and 5% smaller files
    (benchmarks/RESULTS.md, "Whole epoch vs step only, session 5").
    """
    encoding, compression = {}, {}
    for field in schema:
        listed = pa.types.is_list(field.type) or pa.types.is_large_list(field.type)
        leaf = f"{field.name}.list.element" if listed else field.name  # Parquet's column path
        value_type = field.type.value_type if listed else field.type
        if pa.types.is_integer(value_type):
            encoding[leaf], compression[leaf] = "DELTA_BINARY_PACKED", "none"
        elif pa.types.is_floating(value_type):
            encoding[leaf], compression[leaf] = "BYTE_STREAM_SPLIT", "lz4"
        else:
            compression[leaf] = "snappy"
    return {"use_dictionary": False, "column_encoding": encoding, "compression": compression}


class PartWriter:
    """Writes `DIR/part-00000.parquet, ...`: row groups of ROW_GROUP_ROWS, files of FILE_ROWS."""

    def __init__(self, directory: Path, schema: pa.Schema, *, row_group: int = ROW_GROUP_ROWS,
                 file_rows: int = FILE_ROWS):
        self.directory, self.schema = Path(directory), schema
        self.row_group, self.file_rows = row_group, max(file_rows, row_group)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.files: list[Path] = []
        self.rows = 0
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._file_rows = 0

    def write(self, table: pa.Table) -> None:
        self._pending.append(table.cast(self.schema))
        self._pending_rows += table.num_rows
        while self._pending_rows >= self.row_group:
            self._flush(self.row_group)

    def close(self) -> list[Path]:
        while self._pending_rows:
            self._flush(min(self._pending_rows, self.row_group))
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        return self.files

    def _flush(self, n: int) -> None:
        # Cut exactly n rows off the buffer so every row group but the last is full-sized.
        table = pa.concat_tables(self._pending)
        # One chunk per column: the bytes written then depend on the rows alone, not on how
        # the writes were cut (so any number of ingest workers writes the same files).
        head, rest = table.slice(0, n).combine_chunks(), table.slice(n)
        self._pending, self._pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
        if self._writer is None or self._file_rows + n > self.file_rows:
            if self._writer is not None:
                self._writer.close()
            path = self.directory / f"part-{len(self.files):05d}.parquet"
            self._writer = pq.ParquetWriter(path, self.schema, **page_options(self.schema))
            self.files.append(path)
            self._file_rows = 0
        self._writer.write_table(head, row_group_size=n)
        self._file_rows += n
        self.rows += n


# ---------------------------------------------------------------- CSV reads

class CsvStream:
    """Stream a (possibly .gz) CSV/TSV file as record batches, keeping physical line numbers.

    Rows with the wrong field count raise a DataError naming the file and line. Blank lines are
    kept as all-null rows (so line numbers stay exact) and fail the caller's label check.
    """

    def __init__(self, path: str | Path, *, names: list[str], types: dict,
                 delimiter: str = ",", header: bool = True, block_bytes: int = 8 << 20):
        self.path = Path(path)
        self.first_line = 2 if header else 1  # physical line of the first data row
        self._bad: list = []
        read = pa_csv.ReadOptions(column_names=names, skip_rows=1 if header else 0,
                                  use_threads=False, block_size=block_bytes)
        parse = pa_csv.ParseOptions(delimiter=delimiter, ignore_empty_lines=False,
                                    invalid_row_handler=self._on_bad_row)
        convert = pa_csv.ConvertOptions(column_types=types, null_values=[""], strings_can_be_null=True)
        self._names = names
        try:
            self._reader = pa_csv.open_csv(pa.input_stream(str(self.path), compression="detect"),
                                           read_options=read, parse_options=parse, convert_options=convert)
        except (pa.ArrowException, OSError) as e:
            raise self._error(e) from None

    def _on_bad_row(self, row) -> str:
        self._bad.append(row)
        return "error"

    def _error(self, e: Exception) -> DataError:
        if self._bad:
            row = self._bad[0]
            return DataError(f"{self.path}: line {row.number}: expected {row.expected_columns} fields, "
                             f"got {row.actual_columns}: {row.text[:200]!r}")
        msg = str(e)
        if "In CSV column #" in msg:
            # pyarrow names the column by position; give the user its name.
            idx = int(msg.split("In CSV column #")[1].split(":")[0])
            if idx < len(self._names):
                return DataError(f"{self.path}: column {self._names[idx]!r}: {msg}")
        return DataError(f"{self.path}: cannot read as CSV: {msg}")

    def require(self, batch: pa.RecordBatch, name: str, ok: np.ndarray, rows_before: int, what: str) -> None:
        """DataError naming file, line and value at the first row of `batch` where `ok` is False."""
        if ok.all():
            return
        i = int(np.flatnonzero(~ok)[0])
        line = self.first_line + rows_before + i
        value = batch.column(name)[i].as_py()
        shown = "is missing" if value is None else f"{value!r} {what}"
        raise DataError(f"{self.path}: line {line}: {name} {shown}")

    def require_binary(self, batch: pa.RecordBatch, name: str, rows_before: int) -> None:
        """A label column must be 0 or 1 on every row."""
        values = batch.column(name)
        ok = pc.fill_null(pc.is_in(values, value_set=pa.array([0, 1], values.type)), False)
        self.require(batch, name, ok.to_numpy(zero_copy_only=False), rows_before, "is not 0 or 1")

    def batches(self, max_rows: int | None = None) -> Iterator[tuple[int, pa.RecordBatch]]:
        """(data rows before it, batch) up to `max_rows` rows in all; no data row is an error."""
        rows = 0
        for batch in self:
            if max_rows is not None:
                batch = batch.slice(0, max_rows - rows)
            yield rows, batch
            rows += batch.num_rows
            if max_rows is not None and rows >= max_rows:
                break
        if rows == 0:
            raise DataError(f"{self.path}: no data rows")

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        while True:
            try:
                batch = self._reader.read_next_batch()
            except StopIteration:
                return
            except (pa.ArrowException, OSError, EOFError) as e:
                raise self._error(e) from None
            yield batch


def read_first_line(path: str | Path) -> str:
    """The first line of a (possibly compressed) text file, for layout detection."""
    try:
        with pa.input_stream(str(path), compression="detect") as f:
            head = b""
            while b"\n" not in head:
                chunk = f.read(1 << 16)
                if not chunk:
                    break
                head += chunk
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    return head.split(b"\n", 1)[0].decode("utf-8", errors="replace").rstrip("\r")
