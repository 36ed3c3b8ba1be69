"""CLI: `embtables export RUN --out EXPORT [--quantize …]` and `embtables predict EXPORT DATA --out …`."""
from __future__ import annotations

import json

from embtables.serving.quantize import PRECISIONS


def _run_export(args) -> None:
    from embtables.pipelines.serve.export import export_run

    out = export_run(args.run, args.out, quantize=args.quantize, binary_bits=args.binary_bits,
                     checkpoint=args.checkpoint)
    manifest = json.loads((out / "manifest.json").read_text())
    b = manifest["bytes"]
    files = sum(f["bytes"] for f in manifest["files"].values())
    print(f"exported {len(manifest['features'])} features, {len(manifest['tables'])} tables at "
          f"{manifest['precision']}: embedding {b['embedding']:,} bytes (fp32 {b['embedding_fp32']:,}), "
          f"dense {b['dense']:,} bytes, {files:,} bytes on disk → {out}")


def _run_predict(args) -> None:
    import torch

    from embtables.pipelines.serve.predict import predict

    if args.threads:
        torch.set_num_threads(args.threads)
    metrics = predict(args.export, args.data, args.out, metrics_path=args.metrics, batch_size=args.batch_size,
                      split=args.split, device=args.device, backend=args.backend, keep=args.keep,
                      progress=not args.quiet, force=args.force)
    scores = f"  AUC {metrics['auc']:.4f}  logloss {metrics['logloss']:.4f}" if "auc" in metrics else ""
    print(f"{metrics['rows']:,} rows in {metrics['seconds']:.1f}s ({metrics['rows_per_sec']:,.0f} rows/s)"
          f"{scores} → {args.out}")


def add_export_parsers(subparsers) -> None:
    p = subparsers.add_parser("export", help="write a trained run as safetensors + manifest.json")
    p.add_argument("run", help="training run dir")
    p.add_argument("--out", required=True, help="export dir (built beside it, renamed in when complete)")
    p.add_argument("--quantize", choices=PRECISIONS, default="none",
                   help="table precision: none (fp32), int8 (row-wise scale), int4 (row-wise scale+bias), "
                        "binary (sign bits + row scale)")
    p.add_argument("--binary-bits", type=int, default=1, metavar="U",
                   help="binary: residual bits per dim (1 = sign + scale)")
    p.add_argument("--checkpoint", default=None, help="a checkpoint dir of the run (default: the latest)")
    p.set_defaults(func=_run_export)

    p = subparsers.add_parser("predict", help="score Parquet click logs with an export")
    p.add_argument("export")
    p.add_argument("data", help="raw Parquet files/dirs/globs, or an encoded dataset (default split: valid)")
    p.add_argument("--out", required=True, help="predictions Parquet file (never one of the inputs)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out / --metrics file")
    p.add_argument("--metrics", default=None, help="write AUC/logloss/throughput JSON here (labels needed for AUC)")
    p.add_argument("--batch-size", type=int, default=16384)
    p.add_argument("--split", default=None, help="split of an encoded dataset (default: valid)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--backend", default="auto", choices=("auto", "fbgemm", "torch"),
                   help="fp32/int8/int4 lookup: FBGEMM IntNBit (auto: where it imports) or torch")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for scoring (default: torch's, one per core); on a busy machine "
                        "fewer threads than cores can be several times faster")
    p.add_argument("--keep", type=lambda s: [c for c in s.split(",") if c], default=[], metavar="COLS",
                   help="comma-separated input columns to copy into the predictions")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_predict)

