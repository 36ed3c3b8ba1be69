"""The `embtables` command: data | train | eval | compress | export | predict | bench."""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys

from embtables.errors import EmbtablesError

# Subcommands that live beside their pipelines: the commands, module path, function that registers them.
PLUGINS = [
    (("data",), "embtables.pipelines.cli.data", "add_data_parser"),
    (("compress",), "embtables.pipelines.serve.compress", "add_compress_parser"),
    (("export", "predict"), "embtables.pipelines.cli.export", "add_export_parsers"),
    (("bench",), "embtables.pipelines.cli.bench", "add_bench_parser"),
]


def cmd_train(args) -> None:
    from embtables.config import load_config
    from embtables.pipelines.train.local import train

    cfg = load_config(args.config, args.set)
    if args.address is not None or cfg["train"]["workers"] > 1:
        from embtables.pipelines.train.distributed import train_distributed

        metrics = train_distributed(cfg, args.out, resume=args.resume, address=args.address)
    else:
        metrics = train(cfg, args.out, resume=args.resume, progress=not args.quiet)
    print(f"AUC {metrics['auc']:.4f}  logloss {metrics['logloss']:.4f}  "
          f"compression {metrics['compression_ratio']:.1f}x  {metrics['samples_per_sec']:,.0f} samples/s  "
          f"→ {args.out}/metrics.json")


def cmd_eval(args) -> None:
    from embtables.pipelines.train.evaluate import evaluate
    from embtables.pipelines.train.build import load_run
    from embtables.pipelines.train.run_lock import clean_run

    clean_run(args.run)
    check_run_dataset(args.run)
    model, cfg, inputs = load_run(args.run)
    dataset, split = _split_of(args.data, inputs.dataset)
    check_eval_data(args.run, inputs, dataset)
    scores = evaluate(model, dataset, split, inputs.dense_index, cfg["train"]["eval_batch_size"])
    print(json.dumps(scores))


def check_run_dataset(run) -> None:
    """The dataset a run recorded is still the one it trained on (not re-ingested since)."""
    from pathlib import Path

    from embtables.pipelines.data.identity import check_fingerprint

    info = Path(run) / "run.json"
    record = json.loads(info.read_text()) if info.is_file() else {}
    if record.get("dataset") and Path(record["dataset"], "stats.json").is_file():
        check_fingerprint(record["dataset"], record.get("dataset_fingerprint"), f"the run {run}")


def check_eval_data(run, inputs, dataset) -> None:
    """Data other than the run's own is encoded like it: the same ids for the same values, same dense."""
    from pathlib import Path

    from embtables.pipelines.data.encode import load_stats
    from embtables.pipelines.data.identity import check_same_vocabulary, dataset_vocabularies

    if Path(dataset).resolve() == Path(inputs.dataset).resolve():
        return
    reference = f"the run {run} (trained on {inputs.dataset})"
    ours = dataset_vocabularies(inputs.dataset)
    check_same_vocabulary(dataset, {f.name: ours[f.name] for f in inputs.features}, reference)
    if load_stats(dataset)["dense"] != inputs.stats["dense"]:
        raise EmbtablesError(f"{dataset} has dense columns {load_stats(dataset)['dense']}, {reference} has "
                             f"{inputs.stats['dense']}")


def _split_of(data: str | None, default_dataset):
    """`eval RUN [DATA]`: DATA may be an encoded dataset dir (its valid split) or one of its split dirs."""
    from pathlib import Path

    if data is None:
        return default_dataset, "valid"
    path = Path(data)
    if (path / "stats.json").is_file():
        return path, "valid"
    if (path.parent / "stats.json").is_file():
        return path.parent, path.name
    raise EmbtablesError(f"{data}: not an encoded dataset (no stats.json here or in its parent)")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser; with `command`, only that plugin's module is imported (some import torch,
    which costs the `data` commands ~2.5 CPU seconds and ~0.5 GB for nothing)."""
    parser = argparse.ArgumentParser(prog="embtables", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a CTR model from a YAML config")
    p.add_argument("config")
    p.add_argument("--out", required=True, help="run directory (metrics.json, checkpoints)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    p.add_argument("--address", default=None, help="join a Ray cluster (auto | ray://HOST:10001)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="exact AUC/logloss of a trained run")
    p.add_argument("run")
    p.add_argument("data", nargs="?", default=None, help="encoded dataset (default: the run's validation split)")
    p.set_defaults(func=cmd_eval)

    chosen = [plugin for plugin in PLUGINS if command in plugin[0]] or PLUGINS
    for _, module, register in chosen:
        getattr(importlib.import_module(module), register)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # TorchRec's jagged tensors ask torch.fx whether it is tracing; torch 2.13 logs a deprecation
    # notice for that on every process start. It is not ours to act on.
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    try:
        args.func(args)
    except EmbtablesError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permission denied, a file where a directory should be, …
        print(f"error: {os_error_line(e)}", file=sys.stderr)
        return 2
    return 0


def os_error_line(e: OSError) -> str:
    """'PATH: No space left on device' (both paths for a failed rename)."""
    what = e.strerror or str(e)
    if e.filename is None:
        return what
    if e.filename2 is not None:
        return f"{e.filename} → {e.filename2}: {what}"
    return f"{e.filename}: {what}"


if __name__ == "__main__":
    sys.exit(main())
