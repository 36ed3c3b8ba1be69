"""`embtables data ...`: the ingest sub-commands (raw logs → encoded Parquet + stats.json)."""
from __future__ import annotations

import argparse


def _csv_list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _int_list(text: str) -> list[int]:
    try:
        return [int(s) for s in _csv_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _summary(out) -> None:
    from embtables.pipelines.data.encode import load_stats

    stats = load_stats(out)
    splits = stats["splits"]
    ids = sum(f["rows"] for f in stats["features"].values())
    line = (f"{out}: {stats['source']} train {splits['train']['rows']:,} rows, valid {splits['valid']['rows']:,} "
            f"rows, {len(stats['sparse'])} sparse features ({ids:,} ids incl. OOV), {len(stats['dense'])} dense")
    if "planted" in stats:
        line += f", planted valid AUC {stats['planted']['valid_auc']:.4f}"
    unknown = stats.get("movielens", {}).get("ratings_without_movie", 0)
    if unknown:
        line += f" ({unknown} ratings of movies missing from movies.csv: no genres, year OOV)"
    print(line)


def _run_criteo(args):
    from embtables.pipelines.data import ingest_criteo

    _summary(ingest_criteo.ingest(args.raw, args.out, valid_fraction=args.valid_fraction, seed=args.seed,
                                  min_count=args.min_count, max_rows=args.max_rows))


def _run_avazu(args):
    from embtables.pipelines.data import ingest_avazu

    _summary(ingest_avazu.ingest(args.raw, args.out, valid_fraction=args.valid_fraction, seed=args.seed,
                                 min_count=args.min_count, max_rows=args.max_rows))


def _run_movielens(args):
    from embtables.pipelines.data import ingest_movielens

    _summary(ingest_movielens.ingest(args.raw, args.out, seed=args.seed, min_count=args.min_count))


def _run_synth(args):
    from embtables.pipelines.data import ingest_synth

    _summary(ingest_synth.ingest(args.out, preset=args.preset, rows=args.rows, cardinalities=args.cardinalities,
                                 dense=args.dense, zipf=args.zipf, multi_hot=args.multi_hot, seed=args.seed,
                                 valid_fraction=args.valid_fraction, min_count=args.min_count))


def _run_parquet(args):
    import pyarrow as pa

    from embtables.pipelines.data.encode import prepare_parquet

    try:  # jemalloc hands freed pages back sooner than mimalloc's per-thread heaps: lower peak RSS
        pa.set_memory_pool(pa.jemalloc_memory_pool())
    except NotImplementedError:  # a pyarrow built without it keeps its default
        pass

    _summary(prepare_parquet(args.train, args.valid, label=args.label, dense=args.dense, sparse=args.sparse,
                             out=args.out, min_count=args.min_count, valid_fraction=args.valid_fraction,
                             seed=args.seed, workers=args.workers, address=args.address))


def _common(p: argparse.ArgumentParser, split: bool = True) -> None:
    if split:
        p.add_argument("--valid-fraction", type=float, default=0.1, help="share of rows for validation")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/valid split")
    p.add_argument("--min-count", type=int, default=1, help="values seen fewer times in train map to OOV")


def add_data_parser(subparsers) -> argparse.ArgumentParser:
    """Register `data` and its sources on the main CLI's subparsers; each sets `func`."""
    data = subparsers.add_parser("data", help="ingest raw click logs into an encoded Parquet dataset")
    sources = data.add_subparsers(dest="source", required=True)

    for name, run, help_text in (("criteo", _run_criteo, "Criteo train.txt (TSV, optionally .gz) or the CSV sample"),
                                 ("avazu", _run_avazu, "Avazu train CSV")):
        p = sources.add_parser(name, help=help_text)
        p.add_argument("raw")
        p.add_argument("out")
        _common(p)
        p.add_argument("--max-rows", type=int, default=None, help="read only the first N rows")
        p.set_defaults(func=run)

    p = sources.add_parser("movielens", help="ml-latest(-small) directory or the ML-1M sample CSV")
    p.add_argument("raw")
    p.add_argument("out")
    _common(p, split=False)
    p.set_defaults(func=_run_movielens)

    p = sources.add_parser("synth", help="generated click logs with a planted model (known best AUC)")
    p.add_argument("out")
    p.add_argument("--preset", default="criteo26", help="criteo26, criteo26-tail or tiny")
    p.add_argument("--rows", type=int, default=None)
    p.add_argument("--cardinalities", type=_int_list, default=None, help="e.g. 10,1000,100000")
    p.add_argument("--dense", type=int, default=None, help="number of dense features")
    p.add_argument("--zipf", type=float, default=None,
                   help="power-law exponent of id frequencies (default: the preset's, 1.15 for criteo26)")
    p.add_argument("--multi-hot", type=int, default=None, help="number of extra multi-hot features")
    _common(p)
    p.set_defaults(func=_run_synth)

    p = sources.add_parser("parquet", help="any Parquet click log (files, directories or globs)")
    p.add_argument("train")
    p.add_argument("out")
    p.add_argument("--valid", default=None, help="validation Parquet; default: split off --valid-fraction")
    p.add_argument("--label", required=True)
    p.add_argument("--dense", type=_csv_list, default=[])
    p.add_argument("--sparse", type=_csv_list, required=True)
    _common(p)
    p.add_argument("--workers", type=int, default=None,
                   help="threads sharing the stats and encode passes (default: every core; with "
                        "--address: Ray tasks in flight, default the cluster's CPUs)")
    p.add_argument("--address", default=None,
                   help="spread both passes over a Ray cluster (auto | ray://HOST:10001 | local); the input "
                        "paths must be readable on every node")
    p.set_defaults(func=_run_parquet)
    return data
