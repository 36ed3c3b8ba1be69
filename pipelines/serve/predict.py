"""`embtables predict EXPORT DATA --out PRED.parquet`: score click logs with an exported model.

DATA is raw Parquet (files, dirs or globs; raw values in the sparse columns, as given to
`embtables data parquet`) or an encoded dataset (its dir → the valid split, a split dir, or
a part file). Raw values are mapped through the export's own vocabularies (unseen → OOV),
so serving needs nothing from training. Batches stream through with a progress bar; the
output is written beside PRED.parquet and renamed into place when complete. With labels in
the data, --metrics gets exact AUC and log loss.
"""
from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from embtables.errors import ConfigError, DataError
from embtables.metrics import log_loss, roc_auc
from embtables.serving.encoder import RowEncoder


def resolve_data(data, split: str | None, model) -> tuple[list[Path], bool]:
    """(Parquet files, raw?) for DATA; an encoded dataset must share the export's vocabularies."""
    from embtables.pipelines.data.parquet_io import expand_paths
    from embtables.pipelines.data.prepared import encoded_dataset_of
    from embtables.pipelines.data.encode import load_stats

    path = Path(data)
    dataset = encoded_dataset_of(path)
    if dataset is None:
        if split is not None:
            raise DataError(f"--split {split}: {data} is raw Parquet, not an encoded dataset")
        return expand_paths(data), True
    stats = load_stats(dataset)
    if path.is_file():
        files = [path]
    else:
        name = split or (path.name if path != dataset else "valid")
        if name not in stats["splits"]:
            raise DataError(f"{dataset}: no split {name!r}; available: {', '.join(stats['splits'])}")
        files = [dataset / f for f in stats["splits"][name]["files"]]
    for f in model.manifest["features"]:
        mine = pq.read_table(model.path / f["vocab"])["value"] if f["vocab"] else None
        theirs_path = dataset / "vocab" / f"{f['name']}.parquet"
        theirs = pq.read_table(theirs_path, columns=["value"])["value"] if theirs_path.is_file() else None
        same = (mine is None and theirs is None) or (mine is not None and theirs is not None and mine.equals(theirs))
        if not same:
            raise DataError(f"{dataset} was encoded with another vocabulary for feature {f['name']!r} than the "
                            f"export; its ids mean other values. Score the raw Parquet instead.")
    return files, False


def predict(export, data, out, metrics_path=None, batch_size: int = 16384, split: str | None = None,
            device: str = "cpu", backend: str = "auto", keep: list[str] = (), progress: bool = True) -> dict:
    """Score DATA into OUT (Parquet: row, prediction, logit[, label][, kept columns]); returns metrics."""
    from embtables.serving.inference import load
    from embtables.pipelines.data.parquet_io import iter_batches, open_parquet, write_json_atomic

    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    clash = sorted(set(keep) & {"row", "prediction", "logit", "label"})
    if clash:
        raise ConfigError(f"--keep {','.join(clash)}: the predictions already have columns of that name")
    model = load(export, device=device, backend=backend)
    files, raw = resolve_data(data, split, model)
    encoder = RowEncoder(model, raw)
    needed = list(model.dense_names) + list(model.features) + list(keep)
    pfs = [open_parquet(f, needed) for f in files]
    has_label = all(model.label in pf.schema_arrow.names for pf in pfs)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.writing-{uuid.uuid4().hex[:8]}"
    labels, probs = [], []
    row, writer, score_seconds = 0, None, 0.0
    start = time.perf_counter()
    bar = tqdm(total=sum(pf.metadata.num_rows for pf in pfs), unit="rows", desc="predict",
               disable=not progress, mininterval=1.0)
    try:
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
                    cols["label"] = pa.array(enc.label.astype(np.float32))
                    labels.append(enc.label)
                    probs.append(p)
                cols.update({k: batch.column(k) for k in keep})
                table = pa.table(cols)
                writer = writer or pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table)
                row += enc.rows
                file_row += enc.rows
                bar.update(enc.rows)
        if writer is None:
            raise DataError(f"{data}: no rows to score")
        writer.close()
        os.replace(tmp, out)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
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
