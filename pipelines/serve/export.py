"""`embtables export`: a trained run → a self-contained serving artifact.

EXPORT/
  embeddings.safetensors   one tensor per physical table (fp32, or quantized: codes + scale + bias /
                           signs + scale packed together, see tensor_blob.py) and per method tensor
                           (projections, bases, …; method_tensors.py says how a quantized export
                           stores them)
  dense.safetensors        the dense network (DLRM / DCNv2)
  vocab/FEATURE.parquet    raw value → id (id = row number; unseen values → the feature's OOV id)
  manifest.json            written last: features, methods (+ constructor arguments), tables,
                           dtypes and shapes, sha256 per tensor and per file, byte counts, versions

The artifact is built in a hidden sibling directory and renamed into place only when complete,
so a crash never leaves something that looks like an export. Nothing in it refers back to the
training run or dataset.
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import save_file

from embtables.atomic import atomic_dir, check_replaceable, write_json_atomic
from embtables.serving import method_tensors
from embtables.checksums import file_sha256
from embtables.errors import ExportError
from embtables.models import LOOKUP_PREFIX
from embtables.rows import DENSE_TRANSFORM
from embtables.serving.format import (DENSE_FILE, EMBEDDINGS_FILE, EXPORT_FORMAT, EXPORT_VERSION,
                                      MANIFEST, MANIFEST_DIGEST, embtables_version, is_export,
                                      manifest_digest, tensor_sha256)
from embtables.serving.quantize import check_precision, expected_bytes, quantize_table, rows_per_scale, stored_bytes
from embtables.serving.tensor_blob import pack_parts

def gather_checkpoint(checkpoint: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(dense state, whole fp32 table weights by table name) of one checkpoint.

    The single place export reads tables from: by table name, whole, whatever world size
    wrote the checkpoint (a single-process state.pt, or a sharded checkpoint that
    `load_checkpoint` gathers), so everything downstream is independent of how training was
    distributed. Extend here if a layout ever needs streaming table by table.
    """
    from embtables.pipelines.train.checkpoint import load_checkpoint

    state = load_checkpoint(checkpoint)
    if "tables" not in state or "dense" not in state:
        raise ExportError(f"{checkpoint}: checkpoint holds no 'tables'/'dense' state")
    tables = {k[: -len(".weight")]: v for k, v in state["tables"].items() if k.endswith(".weight")}
    dense = {k: v for k, v in state["dense"].items() if not k.startswith(LOOKUP_PREFIX)}
    return dense, tables


def _json_plain(obj):
    """Method hyperparameters as plain JSON (numpy scalars and arrays become numbers and lists)."""
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def export_run(run_dir, out, quantize: str = "none", binary_bits: int = 1, checkpoint=None) -> Path:
    """Write the export of `run_dir` (its latest checkpoint unless given) to `out`; returns `out`."""
    from embtables.pipelines.train.checkpoint import latest_checkpoint
    from embtables.pipelines.train.run_lock import clean_run

    try:
        check_precision(quantize, binary_bits)
    except ValueError as e:
        raise ExportError(str(e)) from None
    run_dir, out = Path(run_dir), Path(out)
    info_path = run_dir / "run.json"
    if not info_path.is_file():
        raise ExportError(f"{run_dir} is not a training run (no run.json)")
    clean_run(run_dir)
    cfg = json.loads(info_path.read_text())["config"]
    ckpt = Path(checkpoint) if checkpoint is not None else latest_checkpoint(run_dir)
    if ckpt is None:
        raise ExportError(f"{run_dir} has no checkpoint to export")
    with _refusals():
        check_replaceable(out, is_export, "an export")  # before any work
    model, inputs, tables = _trained_model(cfg, ckpt)
    emb = model.embeddings
    tensors, table_entries, method_entries = _embedding_tensors(emb, tables, quantize, binary_bits, ckpt)
    network = {k: v.detach().cpu().contiguous() for k, v in model.network.state_dict().items()}
    trained = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    table_bytes = sum(e["bytes"] for e in table_entries)
    method_bytes = sum(d["bytes"] for e in method_entries for d in e["tensors"].values())
    manifest = {
        "format": EXPORT_FORMAT, "format_version": EXPORT_VERSION, "embtables_version": embtables_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {"run": str(run_dir.resolve()), "checkpoint": ckpt.name, "dataset": str(inputs.dataset)},
        "precision": quantize, "binary_bits": binary_bits if quantize == "binary" else None,
        "model": cfg["model"], "dim": emb.dim, "label": inputs.stats["label"],
        "dense": list(inputs.dense), "dense_transform": DENSE_TRANSFORM,
        "features": [], "methods": method_entries, "tables": table_entries,
        "bytes": {
            "tables": table_bytes, "method_tensors": method_bytes, "embedding": table_bytes + method_bytes,
            "embedding_expected": method_bytes + sum(expected_bytes(e["rows"], e["dim"], e["precision"], binary_bits)
                                                     for e in table_entries),
            "embedding_fp32": emb.embedding_bytes(), "full_embedding_fp32": emb.full_embedding_bytes(),
            "dense": sum(v.numel() * v.element_size() for v in network.values()),
        },
        "trained": {k: trained[k] for k in ("auc", "logloss", "embedding_bytes", "valid_rows") if k in trained},
    }
    with _refusals(), atomic_dir(out, replaceable=is_export, what="an export") as tmp:
        _write_vocab(tmp, inputs, manifest)
        save_file(tensors, str(tmp / EMBEDDINGS_FILE), metadata={"format": "pt"})
        save_file(network, str(tmp / DENSE_FILE), metadata={"format": "pt"})
        manifest["tensors"] = {name: _describe(t, EMBEDDINGS_FILE) for name, t in tensors.items()}
        manifest["tensors"].update({f"network/{name}": _describe(t, DENSE_FILE) for name, t in network.items()})
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        for p in files:
            p.chmod(0o644)  # safetensors writes 0600; an artifact is meant to be shipped and read
        manifest["files"] = {p.relative_to(tmp).as_posix(): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
                             for p in files}
        manifest[MANIFEST_DIGEST] = manifest_digest(manifest)  # editing any entry breaks it
        write_json_atomic(tmp / MANIFEST, manifest)  # last: an export without it is incomplete
    return out


def _trained_model(cfg: dict, ckpt: Path):
    """(model with the checkpoint's dense and method state, run inputs, tables by name)."""
    from embtables.pipelines.train.build import build_model, resolve_inputs

    inputs = resolve_inputs(cfg)
    dense_state, tables = gather_checkpoint(ckpt)
    model = build_model(cfg, inputs, backend="torch")
    try:
        missing, unexpected = model.load_state_dict(dense_state, strict=False)
    except RuntimeError as e:  # shapes differ: the code solves the config differently than at training
        raise ExportError(f"{ckpt}: checkpoint does not fit the model the run's config builds now "
                          f"(did a method's solve change since training?): {e}") from None
    missing = [k for k in missing if not k.startswith(LOOKUP_PREFIX)]
    if missing or unexpected:
        raise ExportError(f"{ckpt}: checkpoint does not fit the run's model: missing {missing}, "
                          f"unexpected {unexpected}")
    return model, inputs, tables


def table_precision(rows: int, dim: int, requested: str, binary_bits: int = 1) -> str:
    """`requested`, unless it would not make the table smaller (scales can outweigh the saving
    on 1–2-dim tables with many binary bits): then fp32."""
    return requested if expected_bytes(rows, dim, requested, binary_bits) < rows * dim * 4 else "none"


def _embedding_tensors(emb, tables: dict, quantize: str, binary_bits: int, ckpt: Path):
    """(tensors by name, table entries, method entries) of the embedding layer.

    Tensor names are short (t3, m1.basis): safetensors repeats each in its header, and the
    manifest entries say what each one is.
    """
    tensors: dict[str, torch.Tensor] = {}
    table_entries, method_entries = [], []
    for m in emb.methods:
        for t in m.physical_tables():
            weight = tables.get(t.name)
            if weight is None:
                raise ExportError(f"{ckpt}: no table {t.name!r} (method {m.name!r}); it holds {sorted(tables)}")
            if tuple(weight.shape) != (t.rows, t.dim):
                raise ExportError(f"{ckpt}: table {t.name!r} is {tuple(weight.shape)}, the model needs "
                                  f"({t.rows}, {t.dim})")
            precision = table_precision(t.rows, t.dim, quantize, binary_bits)
            stored = quantize_table(weight, precision, binary_bits)
            name = f"t{len(table_entries)}"
            tensors[name], layout = pack_parts(stored)
            table_entries.append({"name": t.name, "rows": t.rows, "dim": t.dim, "precision": precision,
                                  "binary_bits": binary_bits if precision == "binary" else None,
                                  "rows_per_scale": rows_per_scale(t.dim) if precision != "none" else None,
                                  "tensor": name, "parts": layout, "bytes": stored_bytes(stored)})
    for i, m in enumerate(emb.methods):
        own, entry = m.export()
        entry = _json_plain(entry)
        entry["tensors"] = {}
        for k, v in own.items():
            encoding, parts = method_tensors.encode(v, quantize)
            name = f"m{i}.{k}"
            tensors[name], layout = pack_parts(parts)
            entry["tensors"][k] = {"tensor": name, "encoding": encoding, "dtype": str(v.dtype).removeprefix("torch."),
                                   "shape": list(v.shape), "parts": layout, "bytes": stored_bytes(parts)}
        # (remap key, table) pairs: a key per table, unless several keys share one (multiplexed).
        entry["lookups"] = [list(p) for p in m.lookups()]
        method_entries.append(entry)
    return tensors, table_entries, method_entries


def _describe(t: torch.Tensor, file: str) -> dict:
    return {"file": file, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
            "sha256": tensor_sha256(t)}


def _write_vocab(tmp: Path, inputs, manifest: dict) -> None:
    """Each feature's vocabulary (values only, id = position) and its entry in the manifest."""
    from embtables.pipelines.data.identity import vocabulary_digest
    from embtables.pipelines.data.parquet_io import open_parquet

    (tmp / "vocab").mkdir()
    for f in inputs.features:
        meta = inputs.stats["features"][f.name]
        rel = f"vocab/{f.name}.parquet"
        values = open_parquet(inputs.dataset / rel, ["value"]).read(columns=["value"]) if meta["vocab_size"] \
            else None
        if values is not None:
            pq.write_table(values, tmp / rel)
        manifest["features"].append({
            "name": f.name, "rows": f.rows, "oov_id": f.oov_id, "vocab_size": meta["vocab_size"],
            "value_type": meta["value_type"], "multi_hot": f.multi_hot, "mean_length": f.mean_length,
            "vocab": rel if values is not None else None,
            "vocab_sha256": vocabulary_digest(values["value"] if values is not None else pa.array([], pa.int64()))})


@contextlib.contextmanager
def _refusals():
    """An `out` that is not an export (a file, a non-empty dir) is refused as an ExportError."""
    try:
        yield
    except FileExistsError as e:
        raise ExportError(str(e)) from None
