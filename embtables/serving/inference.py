"""`embtables.load(EXPORT)`: a verified export → an inference module, on CPU or GPU.

Every method is rebuilt from its manifest entry (`Method.from_export`), so serving runs the
methods' own remap and combine code; the tables are served by `ServingLookup`. Nothing is
trusted unread: a missing file or tensor, a checksum that does not match, or a manifest
from a newer embtables raises an `ExportError` that names it.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from torchrec import KeyedJaggedTensor

from embtables.collection import PooledEmbeddingCollection
from embtables.device import resolve_device
from embtables.serving import method_tensors
from embtables.checksums import file_sha256
from embtables.errors import ConfigError, ExportError
from embtables.serving.format import (DENSE_FILE, EMBEDDINGS_FILE, EXPORT_FORMAT, EXPORT_VERSION, MANIFEST,
                                      MANIFEST_DIGEST, embtables_version, manifest_digest,
                                      tensor_sha256)
from embtables.serving.lookup import ServingLookup
from embtables.serving.tensor_blob import unpack_parts


def _version_tuple(v: str) -> tuple | None:
    """(major, minor, patch) of a release string, None when unknown."""
    parts = v.split("+")[0].split(".")[:3]
    return tuple(int(x) for x in parts) if all(x.isdigit() for x in parts) else None


def _newer(made_by: str) -> bool:
    theirs, ours = _version_tuple(made_by), _version_tuple(embtables_version())
    return theirs is not None and ours is not None and theirs > ours


def read_manifest(path: Path) -> dict:
    """The manifest of a complete export from this or an older embtables, else an ExportError."""
    file = path / MANIFEST
    if not path.is_dir():
        raise ExportError(f"{path}: no such export directory")
    if not file.is_file():
        raise ExportError(f"{path}: no {MANIFEST}; not an export, or an export that was never finished")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{file}: unreadable manifest: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{file}: not an {EXPORT_FORMAT} manifest")
    made_by = str(manifest.get("embtables_version", "?"))
    if manifest.get("format_version", 0) > EXPORT_VERSION or _newer(made_by):
        raise ExportError(f"{file}: written by embtables {made_by} (export format "
                          f"{manifest.get('format_version')}), newer than this embtables "
                          f"{embtables_version()} (reads format <= {EXPORT_VERSION}); upgrade embtables")
    # From format 3 on the manifest carries a digest of its own content: an edited entry (dense
    # column order, a checksum, a shape) would otherwise change predictions unnoticed.
    if manifest.get("format_version", 0) >= 3 and manifest.get(MANIFEST_DIGEST) != manifest_digest(manifest):
        what = "has no" if MANIFEST_DIGEST not in manifest else "fails its"
        raise ExportError(f"{file}: {what} {MANIFEST_DIGEST} check; the manifest was edited or corrupted "
                          f"(re-export the run)")
    return manifest


def _load_tensors(path: Path, manifest: dict, file: str, verify: bool) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file, each checked against the manifest."""
    try:
        loaded = load_file(str(path / file))
    except FileNotFoundError:
        raise ExportError(f"{path / file}: missing; the export is incomplete") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise ExportError(f"{path / file}: unreadable (truncated or corrupt?): {e}") from None
    prefix = "network/" if file == DENSE_FILE else ""
    expected = {name: d for name, d in manifest["tensors"].items() if d["file"] == file}
    got = {prefix + k: v for k, v in loaded.items()}
    for name, d in expected.items():
        t = got.get(name)
        if t is None:
            raise ExportError(f"{path / file}: tensor {name!r} is missing")
        if str(t.dtype).removeprefix("torch.") != d["dtype"] or list(t.shape) != d["shape"]:
            raise ExportError(f"{path / file}: tensor {name!r} is {t.dtype} {list(t.shape)}, the manifest "
                              f"says {d['dtype']} {d['shape']}")
        if verify and tensor_sha256(t) != d["sha256"]:
            raise ExportError(f"{path / file}: tensor {name!r} fails its sha256 check (corrupt or tampered)")
    extra = sorted(set(got) - set(expected))
    if extra:
        raise ExportError(f"{path / file}: tensors {extra[:5]} are not in the manifest (tampered?)")
    return got


def _table_parts(entry: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A table's stored parts by role (format 1: a tensor per role; 2: one packed tensor)."""
    if "tensors" in entry:
        return {role: tensors[name] for role, name in entry["tensors"].items()}
    return unpack_parts(tensors[entry["tensor"]], entry["parts"])


def _method_tensor(d, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """A method tensor as the method exported it (format 1: a name; 2: an encoded entry)."""
    if isinstance(d, str):
        return tensors[d]
    return method_tensors.decode(d, unpack_parts(tensors[d["tensor"]], d["parts"]))


def load(path, device: str | torch.device = "cpu", backend: str = "auto", verify: bool = True) -> "InferenceModel":
    """The inference module of an export. backend: auto (FBGEMM IntNBit for fp32/int8/int4 tables
    where it imports) | fbgemm | torch | torchrec (TorchRec's quantized EmbeddingBagCollection). verify: check every tensor's and file's sha256."""
    from embtables.methods import method_class
    from embtables.models import build_network

    path = Path(path)
    device = resolve_device(device)  # a CUDA request without CUDA: a one-line ConfigError
    manifest = read_manifest(path)
    if verify:
        listed = manifest.get("files", {})
        # Every file of the export is listed: deleting an entry must not switch its check off.
        present = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
        unlisted = sorted(present - set(listed) - {MANIFEST})
        if unlisted:
            raise ExportError(f"{path}: files {unlisted[:5]} are not in {MANIFEST} (edited or tampered export)")
        for rel, d in listed.items():
            if rel in (MANIFEST, EMBEDDINGS_FILE, DENSE_FILE):  # tensors are checked one by one below
                continue
            if not (path / rel).is_file():
                raise ExportError(f"{path / rel}: missing; the export is incomplete")
            if file_sha256(path / rel) != d["sha256"]:
                raise ExportError(f"{path / rel}: fails its sha256 check (corrupt or tampered)")
    emb = _load_tensors(path, manifest, EMBEDDINGS_FILE, verify)
    dense = _load_tensors(path, manifest, DENSE_FILE, verify)
    methods = []
    for entry in manifest["methods"]:
        try:
            cls = method_class(entry["method"])
            own = {k: _method_tensor(d, emb) for k, d in entry["tensors"].items()}
            methods.append(cls.from_export(entry, own))
        except (ConfigError, NotImplementedError, TypeError, ValueError, RuntimeError, KeyError) as e:
            raise ExportError(f"{path / MANIFEST}: cannot rebuild method {entry.get('method')!r} for "
                              f"features {entry.get('features')}: {e}") from None
    stored = [_table_parts(t, emb) for t in manifest["tables"]]
    lookups = [p for e in manifest["methods"] for p in e["lookups"]]
    if backend == "torchrec":  # TorchRec's quantized EmbeddingBagCollection holds the tables
        from embtables.serving.torchrec_lookup import TorchRecServingLookup

        lookup = TorchRecServingLookup(manifest["tables"], stored, lookups, device=device)
    else:
        lookup = ServingLookup(manifest["tables"], stored, lookups, backend=backend, device=device)
    network = build_network(manifest["model"], len(manifest["dense"]), len(manifest["features"]), manifest["dim"])
    try:
        network.load_state_dict({k.removeprefix("network/"): v for k, v in dense.items()}, strict=True)
    except RuntimeError as e:
        raise ExportError(f"{path / DENSE_FILE}: does not fit the {manifest['model']['name']} network: {e}") from None
    return InferenceModel(manifest, methods, lookup, network, path).to(device).eval()


class InferenceModel(nn.Module):
    """(dense [B, n_dense] log1p'd, raw-id KJT keyed by feature) → click logits [B].

    The embeddings are the training code's PooledEmbeddingCollection over the export's lookup."""

    def __init__(self, manifest: dict, methods: list, lookup: ServingLookup, network: nn.Module, path: Path):
        super().__init__()
        self.manifest, self.path = manifest, Path(path)
        self.features = [f["name"] for f in manifest["features"]]
        specs = {f.name: f for m in methods for f in m.features}
        self.embeddings = PooledEmbeddingCollection([specs[n] for n in self.features], methods[0].dim, methods,
                                                    lookup)
        listed = [tuple(k) for e in manifest["methods"] for k in e["lookups"]]
        if self.embeddings.keys != listed:
            raise ExportError(f"the methods' remap keys {self.embeddings.keys} differ from the export's {listed}")
        self.network = network
        self.dense_names = list(manifest["dense"])
        self.label = manifest["label"]
        self._vocab: dict[str, object] = {}
        self.register_buffer("_where", torch.zeros(0), persistent=False)  # follows .to(device)

    @property
    def device(self) -> torch.device:
        return self._where.device

    @property
    def lookup(self) -> ServingLookup:
        return self.embeddings.lookup

    def embed(self, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """[B, F, d] in feature order: each method's remap → the lookup → each method's combine."""
        missing = [n for n in self.features if n not in sparse.keys()]
        if missing:
            raise ExportError(f"input lacks sparse features {missing}; the model needs {self.features}")
        # keys ordered on the host in plain torch (no fbgemm op on the device), then moved
        return self.embeddings(self.embeddings.order_input(sparse).to(self.device))

    @torch.no_grad()
    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        return self.network(dense.to(self.device), self.embed(sparse))

    @torch.no_grad()
    def predict_proba(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> np.ndarray:
        return torch.sigmoid(self(dense, sparse).float()).cpu().numpy()

    # --- raw values ----------------------------------------------------------------------
    def vocab_index(self, feature: str):
        """A hash index over the feature's vocabulary (built once): value → id."""
        if feature not in self._vocab:
            import pandas as pd
            import pyarrow.parquet as pq

            meta = next(f for f in self.manifest["features"] if f["name"] == feature)
            values = pq.read_table(self.path / meta["vocab"])["value"].to_numpy() if meta["vocab"] else []
            self._vocab[feature] = pd.Index(values)
        return self._vocab[feature]

    def score(self, table) -> np.ndarray:
        """Click probabilities for rows of raw values (a pyarrow Table/RecordBatch or a dict of columns)."""
        from embtables.serving.encoder import RowEncoder

        encoded = RowEncoder(self, raw=True).encode(table, "input")
        return self.predict_proba(encoded.dense, encoded.sparse)
