"""`embtables bench tradeoff|kernels|throughput|gpu`: memory/AUC sweeps, lookup kernels, end-to-end speed."""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from embtables.errors import EmbtablesError

# bench subcommand → (module, function adding its arguments, function running it)
EXTERNAL = {
    "kernels": ("embtables.pipelines.bench.kernels", "add_kernel_args", "run_kernel_bench",
                "fused lookup backends: forward, backward, optimizer step, GB/s vs memory-copy bandwidth"),
    "throughput": ("embtables.pipelines.bench.throughput", "add_throughput_args", "run_throughput_bench",
                   "end-to-end training samples/s"),
    "gpu": ("embtables.pipelines.bench.gpu", "add_gpu_args", "run_gpu_bench",
            "embedding layer GB/s (forward, train step) vs copy bandwidth per backend, DLRM samples/s, on the device"),
}


def _number_list(text: str) -> list[float]:
    try:
        return [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _name_list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _run_tradeoff(args) -> None:
    from embtables.config import load_config
    from embtables.pipelines.bench.tradeoff import run_tradeoff

    cfg = load_config(args.config, args.set)
    run_tradeoff(cfg, args.out, methods=args.methods, ratios=args.ratios, seeds=args.seeds,
                 address=args.address, cell_cpus=args.cell_cpus, report_only=args.report_only)
    print(f"→ {args.out}/results.csv, results.md, pareto.png")


def _module(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise  # the module exists but something it needs is missing: show the real error
        return None


def _external_runner(sub: str):
    module_name, _, run_name, _ = EXTERNAL[sub]

    def run(args) -> None:
        module = _module(module_name)
        if module is None:
            raise EmbtablesError(f"`embtables bench {sub}` is not available in this build "
                                 f"({module_name} is not installed)")
        result = getattr(module, run_name)(args)
        if getattr(args, "json", None) and result is not None:
            from embtables.pipelines.train.checkpoint import write_json_atomic

            write_json_atomic(Path(args.json), result)
            print(f"→ {args.json}")
    return run


def add_bench_parser(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks: memory/AUC tradeoff, kernels, throughput")
    kinds = bench.add_subparsers(dest="bench", required=True)

    p = kinds.add_parser("tradeoff", help="train every method × ratio × seed; table + Pareto plot",
                         description="Train every method at every ratio on the same data and model; "
                                     "write DIR/results.csv, results.md and pareto.png. Finished cells "
                                     "are kept, so re-running the same command resumes. `full` always "
                                     "runs at ratio 1 as the reference.")
    p.add_argument("config")
    p.add_argument("--methods", type=_name_list, required=True, help="comma-separated, e.g. full,hash,qr")
    p.add_argument("--ratios", type=_number_list, default=[1.0, 10.0, 100.0, 1000.0],
                   help="comma-separated compression ratios (default 1,10,100,1000); 1 = the method's least")
    p.add_argument("--out", required=True, help="sweep directory")
    p.add_argument("--seeds", type=int, default=1, help="seeds per cell: train.seed, +1, … (default 1)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--address", default=None,
                   help="run cells as Ray tasks on this cluster (auto | ray://HOST:10001); default: one by one here")
    p.add_argument("--cell-cpus", type=float, default=1.0, help="CPUs per cell when on Ray (default 1)")
    p.add_argument("--report-only", action="store_true", help="only rewrite the reports from finished cells")
    p.set_defaults(func=_run_tradeoff)

    for sub, (module_name, add_name, _, help_text) in EXTERNAL.items():
        # "resolve": the other module may define --json itself; its definition then wins.
        p = kinds.add_parser(sub, help=help_text, conflict_handler="resolve")
        p.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON")
        module = _module(module_name)
        if module is not None:  # absent: running it says so clearly (see _external_runner)
            getattr(module, add_name)(p)
        p.set_defaults(func=_external_runner(sub))
