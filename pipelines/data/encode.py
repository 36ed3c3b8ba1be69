"""The stats pass and the encoder: plain Parquet click logs → an encoded dataset.

Pass 1 streams the training rows once and counts every sparse value (per-batch
`value_counts`, merged incrementally), giving each feature a vocabulary in descending
frequency order. Pass 2 streams all rows again and maps raw values to ids with `index_in`.
Only one batch and the vocabularies are ever in memory. Rows are validated as they stream.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from embtables.errors import ConfigError, DataError
from embtables.hashing import GOLDEN, mix64_array, uniform_of
from embtables.rows import flatten
from embtables.specs import FeatureSpec
from embtables.atomic import write_json_atomic
from embtables.pipelines.data.identity import check_no_readers, content_fingerprint, vocabulary_digest
from embtables.pipelines.data.parquet_io import (ENCODED_FORMAT, FILE_ROWS, ROW_GROUP_ROWS, PartWriter,
                                                 dataset_dir, expand_paths, is_encoded_dataset, iter_batches,
                                                 open_parquet)

VERSION = 1
STATS_BATCH_ROWS = 65536
ENCODE_BATCH_ROWS = 4 * 65536  # index_in rebuilds its hash set per call: fewer, bigger calls
COMPACT_MIN_ROWS = 1 << 20
FLOAT32_MAX = float(np.finfo(np.float32).max)
BEYOND_FLOAT32 = f"beyond float32 (|x| <= {FLOAT32_MAX:.4g}), the type dense values are stored as"


# ---------------------------------------------------------------- column types

def _sparse_kind(path: Path, name: str, t: pa.DataType) -> tuple[str, bool]:
    """(value_type, multi_hot) of a sparse column, or a DataError for unusable types."""
    multi_hot = pa.types.is_list(t) or pa.types.is_large_list(t)
    inner = t.value_type if multi_hot else t
    if pa.types.is_dictionary(inner):
        inner = inner.value_type
    if pa.types.is_integer(inner):
        return "int64", multi_hot
    if pa.types.is_string(inner) or pa.types.is_large_string(inner):
        return "string", multi_hot
    raise DataError(f"{path}: sparse column {name!r} has type {t}; expected integer ids, strings, "
                    f"or lists of either")


def _check_numeric(path: Path, name: str, t: pa.DataType, role: str) -> None:
    if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
            or pa.types.is_null(t)):
        raise DataError(f"{path}: {role} column {name!r} has type {t}; expected a number")


def _check_schema(path: Path, schema: pa.Schema, label: str, dense: list[str], sparse: list[str],
                  kinds: dict) -> None:
    """Type-check one file and make sure every file agrees on each sparse column's kind."""
    twice = sorted({n for n in schema.names if schema.names.count(n) > 1})
    if twice:  # pyarrow cannot tell which one is meant
        raise DataError(f"{path}: column name(s) {', '.join(map(repr, twice))} appear more than once")
    _check_numeric(path, label, schema.field(label).type, "label")
    for name in dense:
        _check_numeric(path, name, schema.field(name).type, "dense")
    for name in sparse:
        kind = _sparse_kind(path, name, schema.field(name).type)
        if kinds.setdefault(name, kind) != kind:
            raise DataError(f"{path}: sparse column {name!r} holds {_describe(kind)} but earlier "
                            f"files hold {_describe(kinds[name])}")


def _describe(kind: tuple[str, bool]) -> str:
    return f"lists of {kind[0]}" if kind[1] else kind[0]


# ---------------------------------------------------------------- row validation

def _first(mask: pa.Array | np.ndarray) -> int:
    arr = mask.to_numpy(zero_copy_only=False) if isinstance(mask, pa.Array) else mask
    return int(np.flatnonzero(arr)[0])


def validate_batch(batch: pa.RecordBatch, path: Path, row0: int, label: str, dense: list[str],
                   sparse: list[str]) -> None:
    """Raise a DataError naming file, column and row (within the file) for the first bad value."""
    y = batch.column(label).cast(pa.float64())
    bad = pc.fill_null(pc.invert(pc.is_in(y, value_set=pa.array([0.0, 1.0]))), True)
    if pc.any(bad).as_py():
        i = _first(bad)
        raise DataError(f"{path}: row {row0 + i}: label {y[i].as_py()!r} is not 0 or 1")
    for name in dense:
        x = batch.column(name)
        if pa.types.is_floating(x.type) or pa.types.is_integer(x.type):
            # Stored as float32: a value beyond its range would become inf, and inf → NaN weights.
            ok = dense_in_range(x)
            if not ok.all():
                i = _first(~ok)
                raise DataError(f"{path}: row {row0 + i}: dense column {name!r} is {x[i].as_py()}, "
                                f"{BEYOND_FLOAT32}")
    for name in sparse:
        if _sparse_kind(path, name, batch.schema.field(name).type)[0] != "int64":
            continue
        try:
            values, lengths = flatten(batch.column(name))
        except pa.ArrowInvalid as e:  # e.g. uint64 ids beyond the int64 range
            raise DataError(f"{path}: sparse column {name!r}: {e}") from None
        neg = pc.fill_null(pc.less(values, 0), False)
        if pc.any(neg).as_py():
            j = _first(neg)
            i = j if lengths is None else int(np.searchsorted(np.cumsum(lengths), j, side="right"))
            raise DataError(f"{path}: row {row0 + i}: sparse column {name!r} has negative id "
                            f"{values[j].as_py()}")


def dense_in_range(x: pa.Array) -> np.ndarray:
    """True where a dense value fits float32 (missing counts as fitting: it becomes 0)."""
    big = pc.greater(pc.abs(x.cast(pa.float64())), FLOAT32_MAX)
    return ~pc.fill_null(big, False).to_numpy(zero_copy_only=False)


def check_target(out, valid_fraction: float | None = None) -> None:
    """Before any work: the split is possible and `out` may be (re)placed.

    A split needs rows on both sides (0 < fraction < 1, else AUC or training is undefined);
    `out` must be absent, empty or an encoded dataset no running job reads.
    """
    if valid_fraction is not None and not 0.0 < valid_fraction < 1.0:
        raise ConfigError(f"--valid-fraction must be between 0 and 1 (exclusive), got {valid_fraction}")
    out = Path(out)
    if out.exists() and not (out.is_dir() and (is_encoded_dataset(out) or not any(out.iterdir()))):
        raise DataError(f"{out} exists and is not an encoded dataset; refusing to overwrite it")
    check_no_readers(out)


# ---------------------------------------------------------------- the random split

def valid_mask(start: int, n: int, fraction: float, seed: int) -> np.ndarray:
    """Rows [start, start+n) of the stream that go to valid: a seeded hash of the row index."""
    with np.errstate(over="ignore"):  # a fixed, fast integer hash: the split is reproducible everywhere
        z = np.arange(start, start + n, dtype=np.uint64) + np.uint64(seed) * np.uint64(GOLDEN)
    return uniform_of(mix64_array(z)) < fraction


# ---------------------------------------------------------------- counting

class ValueCounter:
    """Counts of one column's values, merged incrementally in bounded memory.

    Per-batch value_counts are buffered and folded into the running table when the buffer
    outgrows it, so the merge cost stays linear and memory stays a small multiple of the vocab.
    """

    def __init__(self):
        self._merged: pa.Table | None = None
        self._parts: list[pa.Table] = []
        self._pending = 0

    def add(self, values: pa.Array) -> None:
        values = pc.drop_null(values)
        if len(values) == 0:
            return
        vc = pc.value_counts(values)
        self._parts.append(pa.table({"value": vc.field("values"), "count": vc.field("counts")}))
        self._pending += len(vc)
        merged = 0 if self._merged is None else self._merged.num_rows
        if self._pending > max(COMPACT_MIN_ROWS, merged):
            self._compact()

    def _compact(self) -> None:
        tables = ([self._merged] if self._merged is not None else []) + self._parts
        if tables:
            grouped = pa.concat_tables(tables).group_by("value").aggregate([("count", "sum")])
            self._merged = grouped.select(["value", "count_sum"]).rename_columns(["value", "count"])
        self._parts, self._pending = [], 0

    def vocab(self, min_count: int, value_type: str) -> pa.Table:
        """Values with count >= min_count, most frequent first, ties by value (deterministic)."""
        self._compact()
        vtype = pa.int64() if value_type == "int64" else pa.string()
        if self._merged is None:
            return pa.table({"value": pa.array([], vtype), "count": pa.array([], pa.int64())})
        t = self._merged.filter(pc.greater_equal(self._merged["count"], min_count))
        return t.sort_by([("count", "descending"), ("value", "ascending")]).cast(
            pa.schema([("value", vtype), ("count", pa.int64())]))


# ---------------------------------------------------------------- encoding

def encode_sparse(col: pa.Array, vocab_values: pa.Array) -> tuple[pa.Array, int, np.ndarray | None]:
    """Raw values → ids (OOV = len(vocab)); returns (ids, number of OOV ids, lengths or None)."""
    values, lengths = flatten(col)
    ids = pc.index_in(values, value_set=vocab_values)
    oov = ids.null_count
    ids = pc.fill_null(ids, len(vocab_values)).cast(pa.int64())
    if lengths is None:
        return ids, oov, None
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), ids), oov, lengths


def encode_dense(col: pa.Array) -> pa.Array:
    """Raw number as float32; null and NaN (missing) become 0.0. No transform here."""
    x = col.cast(pa.float32()) if not pa.types.is_null(col.type) else pa.nulls(len(col), pa.float32())
    x = pc.if_else(pc.fill_null(pc.is_nan(x), False), pa.scalar(0.0, pa.float32()), x)
    return pc.fill_null(x, pa.scalar(0.0, pa.float32()))


def encoded_schema(label: str, dense: list[str], sparse: list[str], kinds: dict) -> pa.Schema:
    fields = [(label, pa.float32())] + [(d, pa.float32()) for d in dense]
    fields += [(s, pa.list_(pa.int64()) if kinds[s][1] else pa.int64()) for s in sparse]
    return pa.schema(fields)


# ---------------------------------------------------------------- the two passes

def _stream(files: list[Path], columns: list[str], batch_rows: int, label, dense, sparse, kinds):
    """(path, row-in-file, row-in-stream, batch) over all files, each batch validated."""
    stream_row = 0
    for path in files:
        pf = open_parquet(path, columns)
        _check_schema(path, pf.schema_arrow, label, dense, sparse, kinds)
        row = 0
        for batch in iter_batches(pf, path, columns, batch_rows):
            validate_batch(batch, path, row, label, dense, sparse)
            yield path, batch, stream_row
            row += batch.num_rows
            stream_row += batch.num_rows


def _check_names(label, dense, sparse) -> None:
    names = [label] + dense + sparse
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"columns used twice (label/dense/sparse): {', '.join(dupes)}")
    if not sparse:
        raise ConfigError("at least one sparse column is needed")
    for n in names:
        if not n or "/" in n or "\\" in n or n.startswith("."):
            raise ConfigError(f"column name {n!r} cannot be used as a feature name")


def prepare_parquet(train_paths, valid_paths, *, label: str, dense, sparse, out, min_count: int = 1,
                    source: str = "parquet", extra_stats: dict | None = None,
                    valid_fraction: float = 0.1, seed: int = 0, keep_existing: bool = False,
                    row_group: int = ROW_GROUP_ROWS, origin=None) -> Path:
    """Encode Parquet click logs into the dataset at `out` (built beside it, renamed in at the end).

    `valid_paths=None` splits the training rows instead: a seeded hash of the row index sends
    `valid_fraction` of them to valid. Vocabularies and counts come from training rows only.
    `row_group` sets the encoded row-group size (files hold 16 row groups).
    With `keep_existing` an existing dataset at `out` is kept (caches; see dataset_dir).
    `origin` names the input in errors about whole splits (ingest: the raw file, not its scratch copy).
    """
    dense, sparse = list(dense), list(sparse)
    _check_names(label, dense, sparse)
    if min_count < 1:
        raise ConfigError(f"min_count must be >= 1, got {min_count}")
    split = valid_paths is None
    check_target(out, valid_fraction if split else None)
    train_files = expand_paths(train_paths)
    valid_files = expand_paths(valid_paths) if valid_paths is not None else []
    columns = [label] + dense + sparse
    kinds: dict[str, tuple[str, bool]] = {}

    def train_part(batch, stream_row):
        if not split:
            return batch
        return batch.filter(pa.array(~valid_mask(stream_row, batch.num_rows, valid_fraction, seed)))

    # Pass 1: vocabularies from the training rows.
    counters = {name: ValueCounter() for name in sparse}
    for _, batch, stream_row in _stream(train_files, columns, STATS_BATCH_ROWS, label, dense, sparse, kinds):
        batch = train_part(batch, stream_row)
        for name in sparse:
            counters[name].add(flatten(batch.column(name))[0])
    vocabs = {name: counters.pop(name).vocab(min_count, kinds[name][0]) for name in sparse}

    # Pass 2: encode every row into the temp dir; rename into place only when all is written.
    schema = encoded_schema(label, dense, sparse, kinds)
    with dataset_dir(out, keep_existing=keep_existing) as tmp:
        (tmp / "vocab").mkdir()
        for name, vocab in vocabs.items():
            pq.write_table(vocab, tmp / "vocab" / f"{name}.parquet")
        file_rows = FILE_ROWS // ROW_GROUP_ROWS * row_group
        writers = {s: PartWriter(tmp / s, schema, row_group=row_group, file_rows=file_rows)
                   for s in ("train", "valid")}
        tally = {s: _Tally(sparse) for s in ("train", "valid")}
        values = {name: vocabs[name]["value"].combine_chunks() for name in sparse}

        def encode(batch, split_name):
            if batch.num_rows == 0:
                return
            cols = {label: batch.column(label).cast(pa.float32())}
            tally[split_name].add_labels(cols[label])
            cols.update({d: encode_dense(batch.column(d)) for d in dense})
            for name in sparse:
                cols[name], oov, lengths = encode_sparse(batch.column(name), values[name])
                tally[split_name].add(name, oov, lengths, batch.num_rows)
            writers[split_name].write(pa.table(cols, schema=schema))

        for _, batch, stream_row in _stream(train_files, columns, ENCODE_BATCH_ROWS, label, dense, sparse, kinds):
            if split:
                mask = valid_mask(stream_row, batch.num_rows, valid_fraction, seed)
                encode(batch.filter(pa.array(~mask)), "train")
                encode(batch.filter(pa.array(mask)), "valid")
            else:
                encode(batch, "train")
        for _, batch, _ in _stream(valid_files, columns, ENCODE_BATCH_ROWS, label, dense, sparse, kinds):
            encode(batch, "valid")
        files = {s: w.close() for s, w in writers.items()}
        for s in ("train", "valid"):
            tally[s].check_labels(s, origin or (train_files[0] if s == "train" or split else valid_files[0]))

        features = {}
        for name in sparse:
            v = len(vocabs[name])
            mean_len, max_len = tally["train"].lengths(name, kinds[name][1])
            features[name] = {
                "vocab_size": v, "rows": v + 1, "oov_id": v, "multi_hot": kinds[name][1],
                "mean_length": mean_len, "max_length": max_len, "min_count": min_count,
                "value_type": kinds[name][0],
                "oov_count_train": tally["train"].oov[name], "oov_count_valid": tally["valid"].oov[name],
                "vocab_sha256": vocabulary_digest(vocabs[name]["value"]),
            }
        stats = {
            "format": ENCODED_FORMAT, "version": VERSION, "source": source,
            "label": label, "dense": dense, "sparse": sparse,
            "splits": {s: {"rows": writers[s].rows, "files": [f"{s}/{p.name}" for p in files[s]]}
                       for s in ("train", "valid")},
            "features": features,
        }
        stats.update(extra_stats or {})
        stats["fingerprint"] = content_fingerprint(tmp, stats)
        write_json_atomic(tmp / "stats.json", stats)
    return Path(out)


class _Tally:
    """Per-split OOV counts and multi-hot lengths, accumulated batch by batch."""

    def __init__(self, sparse: list[str]):
        self.positives = self.rows = 0
        self.oov = {n: 0 for n in sparse}
        self._rows = {n: 0 for n in sparse}
        self._total = {n: 0 for n in sparse}
        self._max = {n: 0 for n in sparse}

    def add(self, name: str, oov: int, lengths: np.ndarray | None, rows: int) -> None:
        self.oov[name] += oov
        self._rows[name] += rows
        if lengths is not None and len(lengths):
            self._total[name] += int(lengths.sum())
            self._max[name] = max(self._max[name], int(lengths.max()))

    def add_labels(self, label: pa.Array) -> None:
        self.rows += len(label)
        self.positives += int(pc.sum(label).as_py() or 0)

    def check_labels(self, split: str, source: Path) -> None:
        """Both classes in the split, or training (train) / AUC (valid) is undefined."""
        if self.rows == 0:
            raise DataError(f"{source}: the {split} split has no rows; give more data or another "
                            f"--valid-fraction")
        if self.positives in (0, self.rows):
            raise DataError(f"{source}: every label of the {split} split ({self.rows} rows) is "
                            f"{int(self.positives > 0)}; a click model needs both 0 and 1 labels "
                            f"(and AUC is undefined without them)")

    def lengths(self, name: str, multi_hot: bool) -> tuple[float, int]:
        if not multi_hot:
            return 1.0, 1
        return (self._total[name] / self._rows[name] if self._rows[name] else 0.0), self._max[name]


# ---------------------------------------------------------------- reading an encoded dataset

def load_stats(path) -> dict:
    """stats.json of an encoded dataset (the dataset dir or the stats.json path itself)."""
    path = Path(path)
    file = path / "stats.json" if path.is_dir() else path
    try:
        stats = json.loads(file.read_text())
    except FileNotFoundError:
        raise DataError(f"{file}: not found; is {path} an encoded dataset (run `embtables data ...`)?") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{file}: unreadable stats: {e}") from None
    if stats.get("format") != ENCODED_FORMAT:
        raise DataError(f"{file}: not an {ENCODED_FORMAT} stats file")
    if stats.get("version", 0) > VERSION:
        raise DataError(f"{file}: dataset version {stats['version']} is newer than this code ({VERSION})")
    return stats


def feature_specs(dataset_dir) -> list[FeatureSpec]:
    """One FeatureSpec per sparse feature, in stats order, with train counts (OOV count last)."""
    dataset_dir = Path(dataset_dir)
    stats = load_stats(dataset_dir)
    specs = []
    for name in stats["sparse"]:
        f = stats["features"][name]
        path = dataset_dir / "vocab" / f"{name}.parquet"
        counts = open_parquet(path, ["count"]).read(columns=["count"])["count"].to_numpy() \
            if f["vocab_size"] else np.zeros(0, dtype=np.int64)
        counts = np.append(counts.astype(np.int64), np.int64(f["oov_count_train"]))
        if len(counts) != f["rows"]:
            raise DataError(f"{path}: holds {len(counts) - 1} values but stats.json says {f['vocab_size']}")
        specs.append(FeatureSpec(name=name, rows=f["rows"], multi_hot=f["multi_hot"],
                                 mean_length=f["mean_length"], counts=counts))
    return specs
