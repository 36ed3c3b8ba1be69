"""The stats pass and the encoder: plain Parquet click logs → an encoded dataset.

Pass 1 streams the training rows once and counts every sparse value (per batch, merged
incrementally: IdCounter's sorted runs for integers, ValueCounter's group-bys for strings),
giving each feature a vocabulary in descending frequency order. Pass 2 streams all rows again
and maps raw values to ids (VocabIndex).
Both passes go row group by row group over every core, or over a Ray cluster (ingest_plan);
only the pieces in flight and the vocabularies are ever in memory. Rows are validated as
they stream.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from embtables.errors import ConfigError, DataError
from embtables.hashing import GOLDEN, mix64_array, uniform_of
from embtables.arrow_sparse import flatten
from embtables.specs import FeatureSpec
from embtables.atomic import write_json_atomic
from embtables.pipelines.data.identity import check_no_readers, content_fingerprint, vocabulary_digest
from embtables.pipelines.data.ingest_plan import Piece, Runner, plan_pieces
from embtables.pipelines.data.parquet_io import (ENCODED_FORMAT, FILE_ROWS, ROW_GROUP_ROWS, PartWriter,
                                                 dataset_dir, expand_paths, is_encoded_dataset, iter_batches,
                                                 open_parquet)

VERSION = 1
STATS_BATCH_ROWS = 1 << 17  # ~40 MB of a Criteo-like piece; fewer, longer runs to merge (a quarter less CPU there)
ENCODE_BATCH_ROWS = 65536  # the vocab hash is built once, so small batches cost nothing: less memory
COMPACT_MIN_ROWS = 1 << 16  # buffered counts per column before a merge: memory ~ vocab, not ~ this × columns
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
    """Counts of one column's values (strings), merged incrementally in bounded memory.

    Per-piece value_counts are buffered and folded into the running table when the buffer
    outgrows it, so the merge cost stays linear and memory stays a small multiple of the vocab.
    """

    def __init__(self):
        self._merged: pa.Table | None = None
        self._parts: list[pa.Table] = []
        self._pending = 0

    def add_counts(self, counts: tuple[pa.Array, pa.Array] | None) -> None:
        """Fold in (values, counts) from `count_values` (None: nothing counted)."""
        if counts is None:
            return
        counts = pa.table({"value": counts[0], "count": counts[1]})
        self._parts.append(counts)
        self._pending += counts.num_rows
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
        self._compact()
        return frequency_ordered(self._merged, min_count, value_type)


class IdCounter:
    """Counts of one integer column as sorted runs (values ascending, counts), merged like a
    binary counter: a new run is merged into the one below while that one is at most twice its
    size, so each count is merged O(log pieces) times by a streaming merge of sorted arrays.
    Never hashed into a growing table: ValueCounter's group-bys re-hash the running table, most
    of the stats pass's time on large vocabularies. Memory: about twice the distinct values.
    """

    def __init__(self):
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []

    def add_counts(self, run: tuple[np.ndarray, np.ndarray] | None) -> None:
        """Fold in a (values, counts) run from `count_values` (None: nothing counted)."""
        if run is None:
            return
        while self._runs and len(self._runs[-1][0]) <= 2 * len(run[0]):
            run = merge_runs(self._runs.pop(), run)
        self._runs.append(run)

    def vocab(self, min_count: int, value_type: str) -> pa.Table:
        while len(self._runs) > 1:
            self._runs.append(merge_runs(self._runs.pop(), self._runs.pop()))
        values, counts = self._runs.pop() if self._runs else (None, None)
        return frequency_ordered(None if values is None else pa.table({"value": values, "count": counts}),
                                 min_count, value_type)


def merge_runs(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Two sorted runs of distinct values → one, counts of shared values summed."""
    values = np.concatenate([a[0], b[0]])
    order = np.argsort(values, kind="stable")  # timsort: two sorted runs merge in linear time
    values, counts = values[order], np.concatenate([a[1], b[1]])[order]
    # A value is at most twice in `values` (once per run): add each second copy to the first.
    first = np.ones(len(values), bool)
    np.not_equal(values[1:], values[:-1], out=first[1:])
    second = np.flatnonzero(~first)
    counts[second - 1] += counts[second]
    return values[first], counts[first]


def frequency_ordered(counts: pa.Table | None, min_count: int, value_type: str) -> pa.Table:
    """Values with count >= min_count, most frequent first, ties by value (deterministic)."""
    vtype = pa.int64() if value_type == "int64" else pa.string()
    if counts is None:
        return pa.table({"value": pa.array([], vtype), "count": pa.array([], pa.int64())})
    t = counts.filter(pc.greater_equal(counts["count"], min_count))
    return t.sort_by([("count", "descending"), ("value", "ascending")]).cast(
        pa.schema([("value", vtype), ("count", pa.int64())]))


def count_values(values: pa.Array) -> tuple | None:
    """The non-null values counted, or None when there are none: integers as a sorted run of
    numpy arrays (values, counts) for IdCounter, strings as Arrow arrays for ValueCounter."""
    values = pc.drop_null(values)
    if len(values) == 0:
        return None
    if pa.types.is_integer(values.type):
        return np.unique(values.to_numpy(), return_counts=True)
    vc = pc.value_counts(values)
    return vc.field("values"), vc.field("counts")


# ---------------------------------------------------------------- encoding

class VocabIndex:
    """Raw value → id of one feature (OOV = len(vocab)).

    Integer ids use a pandas hash index built once: pc.index_in rebuilds its hash set on every
    call, which costs more than the lookups when the vocabulary is large. Strings keep index_in.
    """

    def __init__(self, values: pa.Array):
        self.values, self.size = values, len(values)
        self._index = pd.Index(values.to_numpy()) if pa.types.is_integer(values.type) else None
        if self._index is not None:
            self._index.get_indexer(np.zeros(1, np.int64))  # build the table now, before threads share it

    def ids(self, values: pa.Array) -> pa.Array:
        if self._index is None:
            return pc.fill_null(pc.index_in(values, value_set=self.values), self.size).cast(pa.int64())
        raw = pc.fill_null(values, 0).to_numpy() if values.null_count else values.to_numpy()
        ids = self._index.get_indexer(raw)
        ids[ids < 0] = self.size
        if values.null_count:
            ids[values.is_null().to_numpy(zero_copy_only=False)] = self.size
        return pa.array(ids, pa.int64())


def encode_sparse(col: pa.Array, index: VocabIndex) -> pa.Array:
    """Raw values → ids; a list column stays a list column (a null list becomes empty)."""
    values, lengths = flatten(col)
    ids = index.ids(values)
    if lengths is None:
        return ids
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), ids)


def encode_dense(col: pa.Array) -> pa.Array:
    """Raw number as float32; null and NaN (missing) become 0.0. No transform here."""
    x = col.cast(pa.float32()) if not pa.types.is_null(col.type) else pa.nulls(len(col), pa.float32())
    x = pc.if_else(pc.fill_null(pc.is_nan(x), False), pa.scalar(0.0, pa.float32()), x)
    return pc.fill_null(x, pa.scalar(0.0, pa.float32()))


def encoded_schema(label: str, dense: list[str], sparse: list[str], kinds: dict) -> pa.Schema:
    fields = [(label, pa.float32())] + [(d, pa.float32()) for d in dense]
    fields += [(s, pa.list_(pa.int64()) if kinds[s][1] else pa.int64()) for s in sparse]
    return pa.schema(fields)


# ---------------------------------------------------------------- the two passes, piece by piece

@dataclass
class _Pass:
    """What a worker needs for a piece (picklable: Ray ships it once per pass)."""
    label: str
    dense: list[str]
    sparse: list[str]
    columns: list[str]
    to: str | None         # the split every row goes to; None: a seeded hash of the row picks
    valid_fraction: float
    seed: int
    validate: bool = True  # rows not yet checked (the encode pass re-reads checked train rows)
    arrow_threads: bool = True  # let Arrow decode a piece on several threads
    schema: pa.Schema | None = None          # encode pass only
    indexes: dict[str, VocabIndex] | None = None


def _piece_batches(ctx: _Pass, piece: Piece, batch_rows: int) -> Iterator[tuple[pa.RecordBatch, np.ndarray | None]]:
    """(batch, valid-row mask or None) over one row group, each batch validated."""
    pf = open_parquet(piece.path, ctx.columns)
    row = 0
    # Arrow's own decode threads only where ours are not already busy (memory and switching).
    for batch in iter_batches(pf, piece.path, ctx.columns, batch_rows, row_groups=[piece.row_group],
                              use_threads=ctx.arrow_threads):
        if ctx.validate:
            validate_batch(batch, piece.path, piece.file_row + row, ctx.label, ctx.dense, ctx.sparse)
        mask = valid_mask(piece.stream_row + row, batch.num_rows, ctx.valid_fraction, ctx.seed) \
            if ctx.to is None else None
        yield batch, mask
        row += batch.num_rows


def _count_piece(ctx: _Pass, piece: Piece) -> dict[str, list[tuple]]:
    """Pass 1 on one piece: value counts of every sparse column over its training rows."""
    counts: dict[str, list[tuple]] = {name: [] for name in ctx.sparse}
    for batch, mask in _piece_batches(ctx, piece, STATS_BATCH_ROWS):
        keep = None if mask is None else pa.array(~mask)
        for name in ctx.sparse:
            col = batch.column(name) if keep is None else batch.column(name).filter(keep)
            c = count_values(flatten(col)[0])
            if c is not None:
                counts[name].append(c)
    return counts


def _encode_piece(ctx: _Pass, piece: Piece) -> list[tuple[str, pa.Table]]:
    """Pass 2 on one piece: (split, encoded rows) in stream order."""
    out = []
    for batch, mask in _piece_batches(ctx, piece, ENCODE_BATCH_ROWS):
        cols = {ctx.label: batch.column(ctx.label).cast(pa.float32())}
        cols.update({d: encode_dense(batch.column(d)) for d in ctx.dense})
        cols.update({s: encode_sparse(batch.column(s), ctx.indexes[s]) for s in ctx.sparse})
        table = pa.table(cols, schema=ctx.schema)
        if mask is None:
            out.append((ctx.to, table))
        else:
            out += [("train", table.filter(pa.array(~mask))), ("valid", table.filter(pa.array(mask)))]
    return out


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
                    row_group: int = ROW_GROUP_ROWS, origin=None, workers: int | None = None,
                    address: str | None = None) -> Path:
    """Encode Parquet click logs into the dataset at `out` (built beside it, renamed in at the end).

    `valid_paths=None` splits the training rows instead: a seeded hash of the row index sends
    `valid_fraction` of them to valid. Vocabularies and counts come from training rows only.
    `row_group` sets the encoded row-group size (files hold 16 row groups).
    With `keep_existing` an existing dataset at `out` is kept (caches; see dataset_dir).
    `origin` names the input in errors about whole splits (ingest: the raw file, not its scratch copy).
    `workers` threads share both passes (default: every core); with a Ray `address` they run as
    Ray tasks over the cluster. The output is the same byte for byte whatever runs them.
    """
    dense, sparse = list(dense), list(sparse)
    _check_names(label, dense, sparse)
    if min_count < 1:
        raise ConfigError(f"min_count must be >= 1, got {min_count}")
    if workers is not None and workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    split = valid_paths is None
    check_target(out, valid_fraction if split else None)
    train_files = expand_paths(train_paths)
    valid_files = expand_paths(valid_paths) if valid_paths is not None else []
    columns = [label] + dense + sparse
    kinds: dict[str, tuple[str, bool]] = {}

    def opened(path):
        pf = open_parquet(path, columns)
        _check_schema(path, pf.schema_arrow, label, dense, sparse, kinds)
        return pf

    # Every file is opened and type-checked before any row is read.
    train_pieces = plan_pieces(train_files, opened)
    valid_pieces = plan_pieces(valid_files, opened)
    with Runner(workers, address) as runner:
        train = _Pass(label, dense, sparse, columns, None if split else "train", valid_fraction, seed,
                      arrow_threads=runner.workers == 1)
        # Pass 1: vocabularies from the training rows, counted per piece, merged here.
        counters = {name: IdCounter() if kinds[name][0] == "int64" else ValueCounter() for name in sparse}
        for counts in runner.map(_count_piece, train, train_pieces):
            for name, tables in counts.items():
                for t in tables:
                    counters[name].add_counts(t)
        # One feature at a time: the final merge and sort are the memory peak of the ingest.
        vocabs = {n: counters.pop(n).vocab(min_count, kinds[n][0]) for n in sparse}

        # Pass 2: encode every row into the temp dir; rename into place only when all is written.
        schema = encoded_schema(label, dense, sparse, kinds)
        indexes = {name: VocabIndex(vocabs[name]["value"].combine_chunks()) for name in sparse}
        with dataset_dir(out, keep_existing=keep_existing) as tmp:
            (tmp / "vocab").mkdir()
            for name, vocab in vocabs.items():
                pq.write_table(vocab, tmp / "vocab" / f"{name}.parquet")
            file_rows = FILE_ROWS // ROW_GROUP_ROWS * row_group
            writers = {s: PartWriter(tmp / s, schema, row_group=row_group, file_rows=file_rows)
                       for s in ("train", "valid")}
            tally = {s: _Tally(sparse) for s in ("train", "valid")}
            oov_ids = {name: indexes[name].size for name in sparse}
            passes = [(replace(train, validate=False, schema=schema, indexes=indexes), train_pieces),
                      (replace(train, to="valid", schema=schema, indexes=indexes), valid_pieces)]
            for ctx, pieces in passes:
                for parts in runner.map(_encode_piece, ctx, pieces):
                    for split_name, table in parts:
                        if table.num_rows:
                            tally[split_name].add(table, label, oov_ids)
                            writers[split_name].write(table)
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
    """Per-split rows, positives, OOV counts and multi-hot lengths, from the encoded tables."""

    def __init__(self, sparse: list[str]):
        self.positives = self.rows = 0
        self.oov = {n: 0 for n in sparse}
        self._total = {n: 0 for n in sparse}
        self._max = {n: 0 for n in sparse}

    def add(self, table: pa.Table, label: str, oov_ids: dict[str, int]) -> None:
        self.rows += table.num_rows
        self.positives += int(pc.sum(table.column(label)).as_py() or 0)
        for name, oov_id in oov_ids.items():
            col = table.column(name)
            if pa.types.is_list(col.type):
                lengths = pc.list_value_length(col)
                self._total[name] += int(pc.sum(lengths).as_py() or 0)
                self._max[name] = max(self._max[name], int(pc.max(lengths).as_py() or 0))
                col = pc.list_flatten(col)
            self.oov[name] += int(pc.sum(pc.equal(col, oov_id)).as_py() or 0)

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
        return (self._total[name] / self.rows if self.rows else 0.0), self._max[name]


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
