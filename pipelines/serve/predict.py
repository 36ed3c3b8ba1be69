"""`embtables predict EXPORT DATA --out PRED.parquet`: score click logs with an exported model.

DATA is raw Parquet (files, dirs or globs; raw values in the sparse columns, as given to
`embtables data parquet`) or an encoded dataset (its dir → the valid split, a split dir, or
a part file). Raw values are mapped through the export's own vocabularies (unseen → OOV),
so serving needs nothing from training. Batches stream through with a progress bar; the
output is written beside PRED.parquet and renamed into place when complete. With labels in
the data, --metrics gets exact AUC and log loss.
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from embtables.errors import ConfigError, DataError
from embtables.metrics import log_loss, roc_auc
from embtables.serving.encoder import RowEncoder


def data_files(data, split: str | None) -> tuple[list[Path], Path | None]:
    """(Parquet files, the encoded dataset they belong to or None for raw Parquet) of DATA."""
    from embtables.pipelines.data.encode import load_stats
    from embtables.pipelines.data.parquet_io import expand_paths
    from embtables.pipelines.data.prepared import encoded_dataset_of

    path = Path(data)
    dataset = encoded_dataset_of(path)
    if dataset is None:
        if split is not None:
            raise DataError(f"--split {split}: {data} is raw Parquet, not an encoded dataset")
        return expand_paths(data), None
    stats = load_stats(dataset)
    if path.is_file():
        return [path], dataset
    name = split or (path.name if path != dataset else "valid")
    if name not in stats["splits"]:
        raise DataError(f"{dataset}: no split {name!r}; available: {', '.join(stats['splits'])}")
    return [dataset / f for f in stats["splits"][name]["files"]], dataset


def export_vocabularies(model) -> dict[str, str]:
    """Feature → vocabulary digest of an export (in its manifest; computed for older exports)."""
    from embtables.pipelines.data.identity import vocab_file_digest

    return {f["name"]: f.get("vocab_sha256") or vocab_file_digest(model.path / f["vocab"] if f["vocab"] else None)
            for f in model.manifest["features"]}


def check_output(path: Path, inputs: list[Path], force: bool, flag: str) -> None:
    """Before any work: `path` is a file this command may (over)write, and none of its inputs."""
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a directory; give a file path")
    if path.exists():
        for f in inputs:
            if f.exists() and os.path.samefile(path, f):
                raise ConfigError(f"{flag} {path} is an input of this command ({f}); write elsewhere")
        if not force:
            raise ConfigError(f"{flag} {path} exists; pass --force to overwrite it")
    parent = Path(os.path.abspath(path)).parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{flag} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: cannot write in {parent} (permission denied)")


def predict(export, data, out, metrics_path=None, batch_size: int = 16384, split: str | None = None,
            device: str = "cpu", backend: str = "auto", keep: list[str] = (), progress: bool = True,
            force: bool = False) -> dict:
    """Score DATA into OUT (Parquet: row, prediction, logit[, label][, kept columns]); returns metrics.

    OUT (and --metrics) must not exist unless `force`, and never be one of the inputs.
    """
    from embtables.atomic import atomic_file, write_json_atomic
    from embtables.pipelines.data.identity import check_same_vocabulary
    from embtables.pipelines.data.parquet_io import iter_batches, open_parquet
    from embtables.serving.inference import load

    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    clash = sorted(set(keep) & {"row", "prediction", "logit", "label"})
    if clash:
        raise ConfigError(f"--keep {','.join(clash)}: the predictions already have columns of that name")
    files, dataset = data_files(data, split)
    out = Path(out)
    inputs = files + sorted(p for p in Path(export).rglob("*") if p.is_file())
    check_output(out, inputs, force, "--out")
    if metrics_path is not None:
        metrics_path = Path(metrics_path)
        if os.path.abspath(metrics_path) == os.path.abspath(out):
            raise ConfigError(f"--metrics {metrics_path} is the --out file")
        check_output(metrics_path, inputs + [out], force, "--metrics")
    model = load(export, device=device, backend=backend)
    if dataset is not None:  # encoded ids must mean what the export's ids mean
        check_same_vocabulary(dataset, export_vocabularies(model), f"the export {export}")
    raw = dataset is None
    encoder = RowEncoder(model, raw)
    needed = list(model.dense_names) + list(model.features) + list(keep)
    pfs = [open_parquet(f, needed) for f in files]
    has_label = all(model.label in pf.schema_arrow.names for pf in pfs)
    labels, probs = [], []
    row, writer, score_seconds = 0, None, 0.0
    start = time.perf_counter()
    bar = tqdm(total=sum(pf.metadata.num_rows for pf in pfs), unit="rows", desc="predict",
               disable=not progress, mininterval=1.0)
    # Written beside OUT and renamed in when complete; a failure or kill leaves the old OUT (or none).
    with atomic_file(out, "writing") as tmp, bar, contextlib.ExitStack() as closing:
        for path, pf in zip(files, pfs):
            columns = needed + ([model.label] if has_label else [])
            file_row = 0
            for batch in iter_batches(pf, path, columns, batch_size):
                enc = encoder.encode(batch, str(path), file_row)
                tick = time.perf_counter()
                logits = model(enc.dense, enc.sparse).float().cpu().numpy()
                score_seconds += time.perf_counter() - tick
                p = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
                cols = {"row": pa.array(np.arange(row, row + enc.rows, dtype=np.int64)),
                        "prediction": pa.array(p.astype(np.float32)), "logit": pa.array(logits)}
                if has_label:
                    cols["label"] = pa.array(enc.label.numpy())
                    labels.append(enc.label.numpy())
                    probs.append(p)
                cols.update({k: batch.column(k) for k in keep})
                table = pa.table(cols)
                if writer is None:
                    writer = closing.enter_context(pq.ParquetWriter(tmp, table.schema))
                writer.write_table(table)
                row += enc.rows
                file_row += enc.rows
                bar.update(enc.rows)
        if writer is None:
            raise DataError(f"{data}: no rows to score")
    seconds = time.perf_counter() - start
    metrics = {"rows": row, "seconds": seconds, "rows_per_sec": row / max(seconds, 1e-9),
               "score_rows_per_sec": row / max(score_seconds, 1e-9), "export": str(export), "data": str(data),
               "precision": model.manifest["precision"], "backends": sorted(set(model.lookup.backends)),
               "threads": torch.get_num_threads(), "predictions": str(out)}
    if has_label:
        y, p = np.concatenate(labels), np.concatenate(probs)
        metrics.update(auc=roc_auc(y, p), logloss=log_loss(y, p))
    if metrics_path is not None:
        write_json_atomic(metrics_path, metrics)
    return metrics
