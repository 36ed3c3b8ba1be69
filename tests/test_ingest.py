"""Ingest of every source: Criteo (CSV sample, raw TSV .gz), Avazu, MovieLens (both layouts), synth."""
import argparse
import gzip
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from embtables.errors import DataError
from embtables.pipelines.data import ingest_avazu
from embtables.pipelines.data import ingest_criteo
from embtables.pipelines.data import ingest_movielens
from embtables.pipelines.data import ingest_synth
from embtables.pipelines.cli.data import add_data_parser
from embtables.pipelines.data.encode import load_stats

DATA = Path(__file__).resolve().parents[1] / "data"
SAMPLES = DATA / "samples"


def rows_of(out, split):
    return pq.read_table(out / split).to_pydict()


def all_rows(out):
    t, v = rows_of(out, "train"), rows_of(out, "valid")
    return {k: t[k] + v[k] for k in t}


def vocab(out, name):
    return pq.read_table(out / "vocab" / f"{name}.parquet").to_pydict()


def check_frequency_order(out, name):
    counts = vocab(out, name)["count"]
    assert counts == sorted(counts, reverse=True)


def tsv_line(label, dense, cats):
    return "\t".join([str(label)] + [str(d) for d in dense] + list(cats)) + "\n"


def write_criteo_gz(path, lines):
    with gzip.open(path, "wt") as f:
        f.writelines(lines)
    return path


def test_criteo_csv_sample(tmp_path):
    out = ingest_criteo.ingest(SAMPLES / "criteo_sample.txt", tmp_path / "ds")
    s = load_stats(out)
    assert s["source"] == "criteo" and s["label"] == "label"
    assert s["dense"] == [f"I{i}" for i in range(1, 14)] and s["sparse"] == [f"C{i}" for i in range(1, 27)]
    assert s["splits"]["train"]["rows"] + s["splits"]["valid"]["rows"] == 200
    assert all(f["value_type"] == "string" for f in s["features"].values())
    rows = all_rows(out)
    assert sorted(rows["I3"])[-1] == pytest.approx(max(float(x) for x in _column(SAMPLES / "criteo_sample.txt", 3)))
    check_frequency_order(out, "C1")


def _column(path, index):
    lines = path.read_text().splitlines()[1:]
    return [line.split(",")[index] for line in lines if line.split(",")[index]]


def test_criteo_raw_tsv_gz(tmp_path):
    cats_a = ["68fd1e64"] * 26
    cats_b = ["05db9164"] + [""] * 25
    lines = [tsv_line(1, [1] * 13, cats_a), tsv_line(0, [""] * 12 + [7], cats_b), tsv_line(0, [2] * 13, cats_a)]
    raw = write_criteo_gz(tmp_path / "train.txt.gz", lines * 2 + [tsv_line(1, [3] * 13, cats_b)])
    out = ingest_criteo.ingest(raw, tmp_path / "ds", valid_fraction=0.4)
    rows = all_rows(out)
    assert sorted(zip(rows["label"], rows["I1"], rows["I13"])) == sorted(
        [(1.0, 1.0, 1.0), (0.0, 0.0, 7.0), (0.0, 2.0, 2.0)] * 2 + [(1.0, 3.0, 3.0)])   # empty → 0.0
    c2 = vocab(out, "C2")["value"]
    for i1, i13, id2 in zip(rows["I1"], rows["I13"], rows["C2"]):
        cat_b = i13 == 7 or i1 == 3
        assert (id2 == len(c2)) if cat_b else (c2[id2] == "68fd1e64")      # empty C2 → OOV id
    assert set(vocab(out, "C1")["value"]) <= {"68fd1e64", "05db9164"}
    assert load_stats(out)["features"]["C2"]["oov_count_train"] == sum(
        r in (0.0, 3.0) and i13 in (7.0, 3.0) for r, i13 in zip(rows_of(out, "train")["I1"], rows_of(out, "train")["I13"]))

    limited = ingest_criteo.ingest(raw, tmp_path / "head", valid_fraction=0.5, seed=4, max_rows=4)
    s = load_stats(limited)["splits"]
    assert s["train"]["rows"] + s["valid"]["rows"] == 4


@pytest.mark.parametrize("bad_line,expected", [
    ("0\t1\t2\n", "line 3: expected 40 fields, got 3"),
    (tsv_line(3, [1] * 13, ["aa"] * 26), "line 3: label 3 is not 0 or 1"),
    ("\n", "line 3: label is missing"),
    (tsv_line(1, ["x"] + [1] * 12, ["aa"] * 26), "column 'I1'"),
])
def test_criteo_malformed_rows_name_file_and_line(tmp_path, bad_line, expected):
    good = tsv_line(1, [1] * 13, ["aa"] * 26)
    raw = write_criteo_gz(tmp_path / "broken.txt.gz", [good, good, bad_line, good])
    with pytest.raises(DataError) as e:
        ingest_criteo.ingest(raw, tmp_path / "ds")
    assert "broken.txt.gz" in str(e.value) and expected in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.txt.gz"]  # no OUT, no temp dirs


def test_criteo_rejects_unknown_layout(tmp_path):
    raw = tmp_path / "other.csv"
    raw.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="other.csv: line 1: not a Criteo file"):
        ingest_criteo.ingest(raw, tmp_path / "ds")


def test_avazu_sample(tmp_path):
    out = ingest_avazu.ingest(SAMPLES / "avazu_sample.txt", tmp_path / "ds")
    s = load_stats(out)
    assert s["label"] == "click" and s["dense"] == [] and "id" not in s["sparse"]
    assert s["sparse"][0] == "hour" and s["sparse"][-2:] == ["hour_of_day", "weekday"]
    assert s["splits"]["train"]["rows"] + s["splits"]["valid"]["rows"] == 100
    assert s["features"]["site_id"]["value_type"] == "string"
    assert vocab(out, "weekday")["value"] == [1]   # 2014-10-21 was a Tuesday (Monday = 0)
    assert vocab(out, "hour_of_day")["value"] == [0]
    check_frequency_order(out, "device_ip")


def test_avazu_bad_hour_names_line(tmp_path):
    lines = (SAMPLES / "avazu_sample.txt").read_text().splitlines()[:4]
    fields = lines[3].split(",")
    fields[2] = "14109999"
    raw = tmp_path / "avazu.csv"
    raw.write_text("\n".join(lines[:3] + [",".join(fields)]) + "\n")
    with pytest.raises(DataError, match=r"avazu.csv: line 4: hour '14109999' is not a YYMMDDHH time"):
        ingest_avazu.ingest(raw, tmp_path / "ds")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["avazu.csv"]


def test_movielens_latest_small(tmp_path):
    raw = DATA / "ml-latest-small"
    out = ingest_movielens.ingest(raw, tmp_path / "ds")
    s = load_stats(out)
    assert s["sparse"] == ["userId", "movieId", "genres", "year", "hour", "weekday"]
    ratings = pa_csv.read_csv(raw / "ratings.csv")
    movies = pa_csv.read_csv(raw / "movies.csv").to_pydict()
    n = ratings.num_rows
    assert n > 100_000 and s["splits"]["train"]["rows"] + s["splits"]["valid"]["rows"] == n
    assert 0.08 < s["splits"]["valid"]["rows"] / n < 0.12
    known = set(movies["movieId"])
    unknown = sum(m not in known for m in ratings["movieId"].to_pylist())
    assert s["movielens"]["ratings_without_movie"] == unknown  # kept with no genres, counted
    g = s["features"]["genres"]
    assert g["multi_hot"] and g["value_type"] == "string" and g["max_length"] == 10
    assert "(no genres listed)" not in vocab(out, "genres")["value"]
    assert vocab(out, "hour")["value"] and len(vocab(out, "weekday")["value"]) == 7
    assert s["features"]["year"]["vocab_size"] > 50

    rows = all_rows(out)
    assert np.mean(rows["label"]) == pytest.approx(np.mean(ratings["rating"].to_numpy() >= 4))
    no_genres = {m for m, g in zip(movies["movieId"], movies["genres"]) if g == "(no genres listed)"}
    expected_empty = sum(m in no_genres for m in ratings["movieId"].to_pylist())
    assert expected_empty > 0 and sum(len(x) == 0 for x in rows["genres"]) == expected_empty + unknown


def test_movielens_1m_sample_genres_round_trip(tmp_path):
    raw = SAMPLES / "movielens_sample.txt"
    out = ingest_movielens.ingest(raw, tmp_path / "ds")
    s = load_stats(out)
    assert s["sparse"] == ["user_id", "movie_id", "genres", "year", "hour", "weekday",
                           "gender", "age", "occupation", "zip"]
    names = vocab(out, "genres")["value"]
    decoded = Counter(tuple(names[i] for i in row) for row in all_rows(out)["genres"])
    source = pa_csv.read_csv(raw).to_pydict()
    assert decoded == Counter(tuple(g.split("|")) for g in source["genres"])
    years = vocab(out, "year")["value"]
    assert all(1900 < y < 2010 for y in years)
    assert sorted(vocab(out, "gender")["value"]) == ["F", "M"]


def test_movielens_bad_rating_names_line(tmp_path):
    raw = tmp_path / "ml.csv"
    lines = (SAMPLES / "movielens_sample.txt").read_text().splitlines()[:5]
    lines[2] = lines[2].replace(",3,", ",,", 1)
    raw.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"ml.csv: line 3: rating is missing"):
        ingest_movielens.ingest(raw, tmp_path / "ds")


def test_synth_tiny_planted_model(tmp_path):
    out = ingest_synth.ingest(tmp_path / "ds", preset="tiny", rows=6000, multi_hot=1, row_group=1000)
    s = load_stats(out)
    planted = s["planted"]
    assert 0.75 <= planted["train_auc"] <= 0.85 and 0.70 <= planted["valid_auc"] <= 0.90
    assert 0.2 < planted["valid_logloss"] < 0.7
    labels = np.array(all_rows(out)["label"])
    assert 0.15 <= labels.mean() <= 0.35 and len(labels) == 6000
    assert s["sparse"] == ["C1", "C2", "C3", "C4", "M1"] and len(s["dense"]) == 2
    m = s["features"]["M1"]
    assert m["multi_hot"] and m["max_length"] == 5 and 2.5 < m["mean_length"] < 3.5
    # Raw ids are scrambled 40-bit numbers; the stats pass reorders them by frequency.
    raw_ids = vocab(out, "C4")["value"]
    assert max(raw_ids) > 10 ** 6 and raw_ids != sorted(raw_ids)
    check_frequency_order(out, "C4")
    assert pq.ParquetFile(out / s["splits"]["train"]["files"][0]).metadata.row_group(0).num_rows == 1000

    again = ingest_synth.ingest(tmp_path / "again", preset="tiny", rows=6000, multi_hot=1, row_group=1000)
    assert load_stats(again)["planted"] == planted
    assert rows_of(again, "train") == rows_of(out, "train")


def test_avazu_header_only_is_an_error_and_leaves_nothing(tmp_path):
    raw = tmp_path / "avazu.csv"
    raw.write_text((SAMPLES / "avazu_sample.txt").read_text().splitlines()[0] + "\n")
    with pytest.raises(DataError, match=r"avazu.csv: no data rows"):
        ingest_avazu.ingest(raw, tmp_path / "ds")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["avazu.csv"]


def test_synth_tail_preset_has_a_heavier_tail():
    tail, base = ingest_synth.PRESETS["criteo26-tail"], ingest_synth.PRESETS["criteo26"]
    assert len(tail["cardinalities"]) == 26 and tail["zipf"] < 1.15
    assert sum(tail["cardinalities"]) > 3 * sum(base["cardinalities"])


def test_synth_criteo26_preset_shape():
    cards = ingest_synth.PRESETS["criteo26"]["cardinalities"]
    assert len(cards) == 26 and 1.3e6 < sum(cards) < 1.5e6
    assert sum(c >= 100_000 for c in cards) >= 4 and min(cards) <= 4


def test_cli_data_synth_prints_summary(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="embtables")
    add_data_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", "synth", str(tmp_path / "ds"), "--preset", "tiny", "--rows", "2000",
                              "--cardinalities", "5,50,500", "--seed", "3"])
    args.func(args)
    line = capsys.readouterr().out
    assert "synth" in line and "3 sparse" in line and "planted valid AUC" in line
    assert load_stats(tmp_path / "ds")["synth"]["cardinalities"] == [5, 50, 500]

    args = parser.parse_args(["data", "criteo", str(SAMPLES / "criteo_sample.txt"), str(tmp_path / "c"),
                              "--max-rows", "50", "--min-count", "2"])
    args.func(args)
    assert "criteo" in capsys.readouterr().out
    assert load_stats(tmp_path / "c")["features"]["C1"]["min_count"] == 2
