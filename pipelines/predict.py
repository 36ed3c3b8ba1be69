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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torchrec import KeyedJaggedTensor
from tqdm import tqdm

from embtables.errors import ConfigError, DataError
from embtables.metrics import log_loss, roc_auc


@dataclass
class Encoded:
    dense: torch.Tensor           # [B, n_dense] float32, log1p(max(x, 0))
    sparse: KeyedJaggedTensor     # ids per feature, in the model's feature order
    label: np.ndarray | None
    rows: int


class RowEncoder:
    """Rows of a table → model inputs: raw values through the vocabularies, or checked ids."""

    def __init__(self, model, raw: bool):
        self.model, self.raw = model, raw
        self.meta = {f["name"]: f for f in model.manifest["features"]}

    def encode(self, table, where: str, row0: int = 0) -> Encoded:
        if isinstance(table, dict):
            table = pa.table(table)
        n = table.num_rows
        dense = np.zeros((n, len(self.model.dense_names)), dtype=np.float32)
        for j, name in enumerate(self.model.dense_names):
            x = _column(table, name, where).cast(pa.float32())
            x = pc.fill_null(pc.if_else(pc.fill_null(pc.is_nan(x), False), 0.0, x), 0.0).to_numpy()
            bad = np.isinf(x)
            if bad.any():
                raise DataError(f"{where}: row {row0 + int(np.flatnonzero(bad)[0])}: dense column {name!r} is inf")
            dense[:, j] = np.log1p(np.maximum(x, 0.0))  # the training transform (pipelines/batches.py)
        values, lengths = [], []
        for name in self.model.features:
            ids, lens = self._ids(_column(table, name, where), name, where, row0)
            values.append(ids)
            lengths.append(lens)
        sparse = KeyedJaggedTensor(keys=list(self.model.features), values=torch.from_numpy(np.concatenate(values)),
                                   lengths=torch.from_numpy(np.concatenate(lengths)))
        label = None
        if self.model.label in table.column_names:
            label = table.column(self.model.label).to_numpy(zero_copy_only=False).astype(np.float64)
            bad = ~np.isin(label, (0.0, 1.0))
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise DataError(f"{where}: row {row0 + i}: label {label[i]!r} is not 0 or 1")
        return Encoded(torch.from_numpy(dense), sparse, label, n)

    def _ids(self, col, name: str, where: str, row0: int) -> tuple[np.ndarray, np.ndarray]:
        from embtables.pipelines.stats import flatten

        meta = self.meta[name]
        try:
            flat, lengths = flatten(col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise DataError(f"{where}: sparse column {name!r}: {e}") from None
        lengths = np.ones(len(col), dtype=np.int64) if lengths is None else lengths
        kind = "int64" if pa.types.is_integer(flat.type) else "string"
        expected = meta["value_type"] if self.raw else "int64"
        if kind != expected:
            raise DataError(f"{where}: sparse column {name!r} holds {kind} values but the export expects "
                            f"{expected} {'values' if self.raw else 'ids (encoded data)'}")
        nulls = flat.is_null().to_numpy(zero_copy_only=False)
        if self.raw:  # raw value → id; unseen and missing values → the OOV id
            filled = pc.fill_null(flat, 0 if kind == "int64" else "").to_numpy(zero_copy_only=False)
            ids = self.model.vocab_index(name).get_indexer(filled).astype(np.int64)
            ids[(ids < 0) | nulls] = meta["oov_id"]
            return ids, lengths
        ids = pc.fill_null(flat, -1).to_numpy().astype(np.int64)
        bad = (ids < 0) | (ids >= meta["rows"])
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            i = int(np.searchsorted(np.cumsum(lengths), j, side="right"))
            raise DataError(f"{where}: row {row0 + i}: column {name!r} has id {flat[j].as_py()}, "
                            f"outside [0, {meta['rows']})")
        return ids, lengths


def _column(table, name: str, where: str):
    if name not in table.column_names:
        raise DataError(f"{where}: missing column {name!r}; available columns: {', '.join(table.column_names)}")
    return table.column(name)


def resolve_data(data, split: str | None, model) -> tuple[list[Path], bool]:
    """(Parquet files, raw?) for DATA; an encoded dataset must share the export's vocabularies."""
    from embtables.pipelines.parquet_io import expand_paths
    from embtables.pipelines.prepared import encoded_dataset_of
    from embtables.pipelines.stats import load_stats

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
    from embtables.inference import load
    from embtables.pipelines.parquet_io import iter_batches, open_parquet, write_json_atomic

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
