"""MovieLens ratings → encoded CTR dataset (label = rating >= 4).

Two layouts: an ml-latest(-small) directory (ratings.csv joined with movies.csv), and the
single joined MovieLens-1M CSV of data/samples/movielens_sample.txt. Both give the sparse
features user, movie, genres (multi-hot), year (from the title), hour and weekday (UTC,
Monday = 0); the 1M layout adds gender, age, occupation and zip.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from embtables.errors import DataError
from embtables.pipelines.data.parquet_io import CsvStream, PartWriter, read_first_line, scratch_dir
from embtables.pipelines.data.encode import check_target, prepare_parquet

LABEL = "label"
NO_GENRES = "(no genres listed)"
ML1M_NAMES = ["user_id", "movie_id", "rating", "timestamp", "title", "genres", "gender", "age",
              "occupation", "zip"]
ML1M_TYPES = {"user_id": pa.int64(), "movie_id": pa.int64(), "rating": pa.float64(),
              "timestamp": pa.int64(), "title": pa.string(), "genres": pa.string(),
              "gender": pa.string(), "age": pa.int64(), "occupation": pa.int64(), "zip": pa.string()}
LATEST_TYPES = {"userId": pa.int64(), "movieId": pa.int64(), "rating": pa.float64(), "timestamp": pa.int64()}
TIME_FEATURES = ["year", "hour", "weekday"]


def genre_lists(genres: pa.Array) -> pa.Array:
    """"A|B|C" → ["A", "B", "C"]; "(no genres listed)" and missing → []."""
    lists = pc.split_pattern(pc.fill_null(genres, NO_GENRES), "|")
    flat, parents = pc.list_flatten(lists), pc.list_parent_indices(lists)
    keep = pc.not_equal(flat, NO_GENRES)
    lengths = np.bincount(parents.filter(keep).to_numpy(), minlength=len(genres))
    offsets = np.zeros(len(genres) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), flat.filter(keep))


def title_year(titles: pa.Array) -> pa.Array:
    """The "(1995)" at the end of a title as an int, null when absent."""
    found = pc.extract_regex(titles, r"\((?P<year>\d{4})\)\s*$")
    return pc.struct_field(found, "year").cast(pa.int64())


def time_features(timestamp: pa.Array) -> dict[str, pa.Array]:
    seconds = timestamp.to_numpy(zero_copy_only=False)
    return {"hour": pa.array(seconds // 3600 % 24),
            "weekday": pa.array((seconds // 86400 + 3) % 7)}  # 1970-01-01 was a Thursday


def _check_ratings(stream: CsvStream, batch: pa.RecordBatch, rows: int) -> np.ndarray:
    rating = batch.column("rating")
    ok = pc.fill_null(pc.invert(pc.is_nan(rating)), False).to_numpy(zero_copy_only=False)
    stream.require(batch, "rating", ok, rows, "is not a number")
    stream.require(batch, "timestamp", pc.is_valid(batch.column("timestamp")).to_numpy(zero_copy_only=False),
                   rows, "")
    return (rating.to_numpy(zero_copy_only=False) >= 4.0).astype(np.float32)


class _Movies:
    """movies.csv as lookup arrays: movieId → genres list and year (null when unknown)."""

    def __init__(self, path: Path):
        try:
            t = pa_csv.read_csv(path, convert_options=pa_csv.ConvertOptions(
                column_types={"movieId": pa.int64(), "title": pa.string(), "genres": pa.string()},
                include_columns=["movieId", "title", "genres"]))
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: cannot read movies: {e}") from None
        order = np.argsort(t["movieId"].to_numpy())
        t = t.take(order)
        self.ids = t["movieId"].to_numpy()
        self.genres = genre_lists(t["genres"].combine_chunks())
        self.years = title_year(t["title"].combine_chunks())

    def lookup(self, movie_ids: np.ndarray) -> tuple[pa.Array, pa.Array, int]:
        """(genres, years, number of unknown movies); unknown ones get [] and a null year."""
        pos = np.minimum(np.searchsorted(self.ids, movie_ids), max(len(self.ids) - 1, 0))
        known = self.ids[pos] == movie_ids if len(self.ids) else np.zeros(len(movie_ids), bool)
        idx = pa.array(pos, mask=~known)
        return self.genres.take(idx), self.years.take(idx), int((~known).sum())


def _convert_latest(raw: Path, writer_dir: Path) -> tuple[list[str], dict]:
    movies = _Movies(raw / "movies.csv")
    stream = CsvStream(raw / "ratings.csv", names=list(LATEST_TYPES), types=LATEST_TYPES, header=True)
    sparse = ["userId", "movieId", "genres"] + TIME_FEATURES
    writer = None
    rows = unknown = 0
    for batch in stream:
        label = _check_ratings(stream, batch, rows)
        genres, years, missing = movies.lookup(batch.column("movieId").to_numpy(zero_copy_only=False))
        unknown += missing
        table = pa.table({LABEL: label, "userId": batch.column("userId"), "movieId": batch.column("movieId"),
                          "genres": genres, "year": years, **time_features(batch.column("timestamp"))})
        writer = writer or PartWriter(writer_dir, table.schema)
        writer.write(table)
        rows += batch.num_rows
    # Kept, not dropped: counted so the summary can say how many ratings lack movie metadata.
    return _finish(writer, raw / "ratings.csv", sparse), {"layout": "ml-latest", "ratings_without_movie": unknown}


def _convert_ml1m(raw: Path, writer_dir: Path) -> tuple[list[str], dict]:
    stream = CsvStream(raw, names=ML1M_NAMES, types=ML1M_TYPES, header=True)
    sparse = ["user_id", "movie_id", "genres"] + TIME_FEATURES + ["gender", "age", "occupation", "zip"]
    writer = None
    rows = 0
    for batch in stream:
        label = _check_ratings(stream, batch, rows)
        cols = {LABEL: label, "user_id": batch.column("user_id"), "movie_id": batch.column("movie_id"),
                "genres": genre_lists(batch.column("genres")), "year": title_year(batch.column("title")),
                **time_features(batch.column("timestamp"))}
        cols.update({c: batch.column(c) for c in ("gender", "age", "occupation", "zip")})
        table = pa.table(cols)
        writer = writer or PartWriter(writer_dir, table.schema)
        writer.write(table)
        rows += batch.num_rows
    return _finish(writer, raw, sparse), {"layout": "ml-1m"}


def _finish(writer: PartWriter | None, path: Path, sparse: list[str]) -> list[str]:
    if writer is None or writer.close() == []:
        raise DataError(f"{path}: no data rows")
    return sparse


def ingest(raw, out, *, seed: int = 0, valid_fraction: float = 0.1, min_count: int = 1) -> Path:
    """Convert MovieLens to plain Parquet beside `out`, then encode it with a seeded 90/10 split."""
    raw = Path(raw)
    check_target(out, valid_fraction)
    with scratch_dir(out, "raw") as tmp:
        if raw.is_dir():
            for name in ("ratings.csv", "movies.csv"):
                if not (raw / name).is_file():
                    raise DataError(f"{raw}: not a MovieLens directory (no {name})")
            sparse, info = _convert_latest(raw, tmp)
        elif read_first_line(raw).split(",") == ML1M_NAMES:
            sparse, info = _convert_ml1m(raw, tmp)
        else:
            raise DataError(f"{raw}: line 1: expected an ml-latest directory or a CSV with header "
                            f"{','.join(ML1M_NAMES)}")
        return prepare_parquet(tmp, None, label=LABEL, dense=[], sparse=sparse, out=out, min_count=min_count,
                               source="movielens", valid_fraction=valid_fraction, seed=seed,
                               extra_stats={"movielens": info}, origin=raw)
