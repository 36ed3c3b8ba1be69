"""Export → load → predict: exact fp32 round trips for every method, quantized exports, raw
Parquet scoring through the export's vocabularies, and corrupt/half-written exports."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file
from torchrec import KeyedJaggedTensor

import embtables
from embtables.pipelines.serve import export as export_mod
from embtables.pipelines.cli.main import main as cli_main
from embtables.collection import build_embeddings
from embtables.config import load_config
from embtables.errors import DataError, ExportError
from embtables.pipelines.serve.export import export_run, table_precision
from embtables.methods import REGISTRY, method_class
from embtables.pipelines.train.evaluate import predict_split
from embtables.pipelines.serve.predict import predict
from embtables.pipelines.train.build import load_run
from embtables.pipelines.data.encode import prepare_parquet
from embtables.specs import FeatureSpec
from embtables.pipelines.train.local import train

CARDS = {"user": 2000, "item": 1500, "c3": 800, "c4": 800, "c5": 600, "c6": 400}


def raw_table(rows: int, seed: int, unseen: bool = False) -> pa.Table:
    """Click rows from a planted logistic model: int and string ids, a multi-hot string column."""
    rng = np.random.default_rng(seed)
    cols, logit = {}, np.zeros(rows)
    for j, (name, card) in enumerate(CARDS.items()):
        # Half power-law, half uniform: a head to learn, and a vocabulary large enough that
        # safetensors' header is a small share of the file.
        ids = np.where(rng.random(rows) < 0.5, np.minimum(rng.zipf(1.3, rows) - 1, card - 1),
                       rng.integers(0, card, rows))
        logit += np.sin(ids * (j + 1.7)) * 0.8
        cols[name] = [f"s{i}" for i in ids] if name == "item" else ids + 1000 * j + (10**6 if unseen else 0)
    tags = [[f"t{int(t)}" for t in rng.integers(0, 40, rng.integers(0, 4))] for _ in range(rows)]
    logit += np.array([0.3 * len(t) - 0.45 for t in tags])
    dense = rng.exponential(3.0, rows)
    logit += 0.3 * np.log1p(dense) - 0.5
    label = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    return pa.table({"label": label, "I1": dense, **cols, "tags": tags})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export_data")
    pq.write_table(raw_table(4000, 0), tmp / "train.parquet")
    pq.write_table(raw_table(800, 1), tmp / "valid.parquet")
    pq.write_table(raw_table(300, 2, unseen=True), tmp / "unseen.parquet")
    ds = prepare_parquet(tmp / "train.parquet", tmp / "valid.parquet", label="label", dense=["I1"],
                         sparse=[*CARDS, "tags"], out=tmp / "ds", row_group=512)
    return tmp, ds


def other_methods() -> list[str]:
    """Methods that exist now, build from a plain config (optembed trains in stages) and run
    through the training collection (a probe forward on a small feature)."""
    found = []
    for name in REGISTRY:
        if name in ("full", "optembed"):
            continue
        try:
            feature = FeatureSpec("f", 200, counts=np.arange(200, 0, -1))
            methods = method_class(name).solve_group([feature], 16, 4.0)
            kjt = KeyedJaggedTensor(keys=["f"], values=torch.tensor([1, 5, 199]), lengths=torch.tensor([1, 2]))
            build_embeddings([feature], 16, methods, backend="torch")(kjt)
        except Exception:  # not written yet, or not wired into the collection yet
            continue
        found.append(name)
    return found


def run(tmp, ds, name, features: dict | None = None, dim: int = 16, compression: dict | None = None):
    cfg_path = tmp / f"{name}.yaml"
    every = f"compression: {json.dumps(compression)}, " if compression else ""
    cfg_path.write_text(f"data: {{train: {ds}}}\nmodel: {{name: dlrm, bottom_mlp: [8], top_mlp: [16]}}\n"
                        f"embedding: {{dim: {dim}, backend: torch, {every}features: {json.dumps(features or {})}}}\n"
                        "train: {batch_size: 256, epochs: 2, threads: 1}\n")
    out = tmp / name
    metrics = train(load_config(cfg_path), out, progress=False)
    return out, metrics


@pytest.fixture(scope="module")
def full_run(data):
    tmp, ds = data
    return run(tmp, ds, "full_run")


@pytest.fixture(scope="module")
def mixed_run(data):
    """One run where each large feature uses another method (whichever exist)."""
    tmp, ds = data
    names = [*CARDS, "tags"]
    features = {f: {"compression": {"method": m, "ratio": 4}} for f, m in zip(names, other_methods())}
    return run(tmp, ds, "mixed_run", features)


def model_probs(run_dir):
    model, cfg, inputs = load_run(run_dir)
    return predict_split(model, inputs.dataset, "valid", inputs.dense_index, 4096)


def test_fp32_export_reproduces_full_run(tmp_path, full_run, data):
    run_dir, metrics = full_run
    out = export_run(run_dir, tmp_path / "exp")
    m = predict(out, data[1], tmp_path / "pred.parquet", tmp_path / "m.json", progress=False)
    assert abs(m["auc"] - metrics["auc"]) < 1e-4 and m["rows"] == metrics["valid_rows"]
    labels, probs = model_probs(run_dir)
    pred = pq.read_table(tmp_path / "pred.parquet")
    assert pred.column_names == ["row", "prediction", "logit", "label"]
    assert np.allclose(pred["prediction"].to_numpy(), probs, atol=1e-6)
    assert (pred["label"].to_numpy() == labels).all()
    assert json.loads((tmp_path / "m.json").read_text())["auc"] == pytest.approx(m["auc"])
    manifest = json.loads((out / "manifest.json").read_text())
    # Bytes on disk: tensors within 5% of embedding_bytes + the dense model.
    on_disk = (out / "embeddings.safetensors").stat().st_size + (out / "dense.safetensors").stat().st_size
    expected = metrics["embedding_bytes"] + manifest["bytes"]["dense"]
    assert abs(on_disk - expected) <= 0.05 * expected
    assert manifest["bytes"]["embedding"] == metrics["embedding_bytes"]


def test_every_method_round_trips_in_fp32(tmp_path, mixed_run, data):
    run_dir, metrics = mixed_run
    used = {m["method"] for m in metrics["embedding"]}
    assert set(other_methods()) <= used and "full" in used
    out = export_run(run_dir, tmp_path / "exp")
    m = predict(out, data[1], tmp_path / "pred.parquet", progress=False)
    _, probs = model_probs(run_dir)
    assert np.allclose(pq.read_table(tmp_path / "pred.parquet")["prediction"].to_numpy(), probs, atol=1e-6)
    assert abs(m["auc"] - metrics["auc"]) < 1e-4
    manifest = json.loads((out / "manifest.json").read_text())
    assert {e["method"] for e in manifest["methods"]} == used
    assert manifest["bytes"]["embedding"] == metrics["embedding_bytes"]


def test_format_1_exports_still_load(tmp_path, mixed_run, data):
    """Format 1 named a tensor per role and method tensors by name; an fp32 export differs from
    it only in the manifest, so rewriting that gives a format-1 export to load."""
    run_dir, metrics = mixed_run
    out = export_run(run_dir, tmp_path / "exp")
    m = json.loads((out / "manifest.json").read_text())
    for t in m["tables"]:
        assert [p["role"] for p in t.pop("parts")] == ["weight"]
        t["tensors"] = {"weight": t.pop("tensor")}
    for e in m["methods"]:
        e["tensors"] = {k: d["tensor"] for k, d in e["tensors"].items()}
    m["format_version"] = 1
    (out / "manifest.json").write_text(json.dumps(m))
    assert abs(predict(out, data[1], tmp_path / "p.parquet", progress=False)["auc"] - metrics["auc"]) < 1e-4


def test_quantizing_never_grows_a_table(tmp_path, mixed_run, data):
    # 8 residual bits a dim on a 1-dim table: 8 bytes of signs a row (+ shared scales) > 4 of fp32.
    assert table_precision(1000, 1, "binary", 8) == "none" and table_precision(1000, 2, "binary", 8) == "none"
    assert table_precision(1000, 3, "binary", 8) == "binary" and table_precision(1000, 1, "int4") == "int4"
    run_dir, _ = mixed_run
    out = export_run(run_dir, tmp_path / "exp", quantize="binary", binary_bits=8)
    tables = json.loads((out / "manifest.json").read_text())["tables"]
    assert all(t["bytes"] < t["rows"] * t["dim"] * 4 or t["precision"] == "none" for t in tables)
    assert any(t["dim"] < 16 and t["precision"] == "binary" for t in tables)  # narrow tables share scales
    m = predict(out, data[1], tmp_path / "p.parquet", progress=False)
    assert abs(m["auc"] - mixed_run[1]["auc"]) < 0.01


def test_int8_shrinks_method_tensors_too(tmp_path, mixed_run, data):
    """Projections and low-rank bases go int8 with the tables: ≤ 30% of the fp32 bytes, AUC kept."""
    run_dir, metrics = mixed_run
    out = export_run(run_dir, tmp_path / "exp", quantize="int8")
    manifest = json.loads((out / "manifest.json").read_text())
    encodings = {(e["method"], d["encoding"]) for e in manifest["methods"] for d in e["tensors"].values()}
    assert {("mixed_dim", "int8"), ("low_rank", "int8")} <= encodings
    assert manifest["bytes"]["embedding"] <= 0.3 * metrics["embedding_bytes"]
    m = predict(out, data[1], tmp_path / "p.parquet", progress=False)
    assert abs(m["auc"] - metrics["auc"]) < 0.002


def test_multiplexed_run_exports_and_serves(tmp_path, data):
    """Every feature in one shared table, read by a key per (feature, chunk): fp32 serves the
    trained model exactly; int8 within 0.002 AUC at ≤ 30% of the bytes on both serving paths."""
    run_dir, metrics = run(tmp_path, data[1], "mux", compression={"method": "multiplexed", "ratio": 4})
    out = export_run(run_dir, tmp_path / "fp32")
    manifest = json.loads((out / "manifest.json").read_text())
    read = [table for e in manifest["methods"] for _, table in e["lookups"]]
    assert len(read) > len(set(read)) == len(manifest["tables"])  # several keys per table
    m = predict(out, data[1], tmp_path / "p.parquet", progress=False)
    _, probs = model_probs(run_dir)
    assert np.allclose(pq.read_table(tmp_path / "p.parquet")["prediction"].to_numpy(), probs, atol=1e-6)
    assert abs(m["auc"] - metrics["auc"]) < 1e-4
    q = export_run(run_dir, tmp_path / "int8", quantize="int8")
    assert json.loads((q / "manifest.json").read_text())["bytes"]["embedding"] <= 0.3 * metrics["embedding_bytes"]
    mq = predict(q, data[1], tmp_path / "q.parquet", progress=False)
    assert abs(mq["auc"] - metrics["auc"]) < 0.002
    predict(q, data[1], tmp_path / "t.parquet", backend="torch", progress=False)
    assert np.allclose(pq.read_table(tmp_path / "q.parquet")["logit"].to_numpy(),
                       pq.read_table(tmp_path / "t.parquet")["logit"].to_numpy(), atol=1e-5)


@pytest.mark.parametrize("precision", ["int8", "int4", "binary"])
def test_quantized_exports(tmp_path, full_run, data, precision):
    run_dir, metrics = full_run
    out = export_run(run_dir, tmp_path / "exp", quantize=precision)
    manifest = json.loads((out / "manifest.json").read_text())
    b = manifest["bytes"]
    assert b["embedding"] == b["embedding_expected"]
    on_disk = (out / "embeddings.safetensors").stat().st_size
    # One tensor a table keeps safetensors' header under 5% even of ~20 KB binary tables.
    assert abs(on_disk - b["embedding"]) <= 0.05 * b["embedding"]
    header = int.from_bytes((out / "embeddings.safetensors").read_bytes()[:8], "little")
    assert on_disk - 8 - header == b["embedding"]  # the rest is safetensors' JSON header
    m = predict(out, data[1], tmp_path / "p.parquet", progress=False)
    if precision == "int8":
        assert b["embedding"] <= 0.3 * metrics["embedding_bytes"]
        assert abs(m["auc"] - metrics["auc"]) < 0.002
    else:
        assert m["auc"] > 0.55  # degraded at most, never broken
    predict(out, data[1], tmp_path / "t.parquet", backend="torch", progress=False)
    assert np.allclose(pq.read_table(tmp_path / "p.parquet")["logit"].to_numpy(),
                       pq.read_table(tmp_path / "t.parquet")["logit"].to_numpy(), atol=1e-5)


def test_out_of_range_ids_raise_in_a_quantized_export(tmp_path, full_run):
    """`full` passes raw ids straight to the IntNBit TBE, which would read row 0 for an id past
    the table: serving raises the training lookups' IndexError instead, naming the table."""
    out = export_run(full_run[0], tmp_path / "exp", quantize="int8")
    model = embtables.load(out)
    rows = {t["name"]: t["rows"] for t in model.lookup.tables}
    features = model.features
    dense = torch.zeros(2, len(model.dense_names))

    def kjt(bad: int | None) -> KeyedJaggedTensor:
        ids = [[0, 1] for _ in features]
        if bad is not None:
            ids[1][1] = bad
        return KeyedJaggedTensor(keys=features, values=torch.tensor([i for pair in ids for i in pair]),
                                 lengths=torch.ones(2 * len(features), dtype=torch.int64))

    assert model(dense, kjt(None)).shape == (2,)
    table = model.embeddings.tables[model.embeddings.key_tables[1]].name
    for backend in (["fbgemm", "torch"] if "fbgemm" in model.lookup.backends else ["torch"]):
        model = embtables.load(out, backend=backend)
        for bad in (rows[table], -1):
            with pytest.raises(IndexError, match=rf"table '{table}': index {bad} at position 3 is out of range"):
                model(dense, kjt(bad))


def test_raw_parquet_scores_like_encoded(tmp_path, full_run, data):
    tmp, ds = data
    out = export_run(full_run[0], tmp_path / "exp")
    enc = predict(out, ds, tmp_path / "enc.parquet", progress=False)
    raw = predict(out, tmp / "valid.parquet", tmp_path / "raw.parquet", keep=["user"], progress=False)
    a, b = pq.read_table(tmp_path / "enc.parquet"), pq.read_table(tmp_path / "raw.parquet")
    assert np.allclose(a["logit"].to_numpy(), b["logit"].to_numpy(), atol=1e-6) and raw["auc"] == enc["auc"]
    assert b["user"].to_pylist() == pq.read_table(tmp / "valid.parquet")["user"].to_pylist()
    # Values never seen in training score exactly like the OOV id.
    model = embtables.load(out)
    unseen = pq.read_table(tmp / "unseen.parquet")
    p = model.score(unseen)
    oov = unseen.drop_columns(["user", "c3"]).append_column("user", pa.array([-5] * 300)) \
        .append_column("c3", pa.array([None] * 300, pa.int64()))
    assert np.allclose(p, model.score(oov), atol=1e-6)


def test_bad_predict_inputs(tmp_path, full_run, data):
    tmp, ds = data
    out = export_run(full_run[0], tmp_path / "exp")
    t = pq.read_table(tmp / "valid.parquet")
    pq.write_table(t.drop_columns(["c4"]), tmp_path / "nocol.parquet")
    with pytest.raises(DataError, match=r"nocol\.parquet.*missing column 'c4'"):
        predict(out, tmp_path / "nocol.parquet", tmp_path / "x.parquet", progress=False)
    pq.write_table(t.drop_columns(["item"]).append_column("item", pa.array(range(t.num_rows))), tmp_path / "ty.parquet")
    with pytest.raises(DataError, match="'item' holds int64 values but the export expects string"):
        predict(out, tmp_path / "ty.parquet", tmp_path / "x.parquet", progress=False)
    other = prepare_parquet(tmp / "unseen.parquet", None, label="label", dense=["I1"], sparse=[*CARDS, "tags"],
                            out=tmp_path / "other")
    with pytest.raises(DataError, match="another vocabulary"):
        predict(out, other, tmp_path / "x.parquet", progress=False)
    assert not (tmp_path / "x.parquet").exists()


def test_corrupt_and_tampered_exports(tmp_path, full_run):
    good = export_run(full_run[0], tmp_path / "good")
    embtables.load(good)

    def broken(name, edit):
        bad = tmp_path / name
        export_run(full_run[0], bad)
        edit(bad)
        return bad

    def flip(p):
        data = bytearray((p / "embeddings.safetensors").read_bytes())
        data[-3] ^= 0xFF
        (p / "embeddings.safetensors").write_bytes(bytes(data))

    user = next(t["tensor"] for t in json.loads((good / "manifest.json").read_text())["tables"]
                if t["name"].startswith("user/"))

    def drop(p):
        t = load_file(str(p / "embeddings.safetensors"))
        save_file({k: v for k, v in t.items() if k != user}, str(p / "embeddings.safetensors"))

    def newer(p):
        m = json.loads((p / "manifest.json").read_text())
        m["format_version"] += 1
        (p / "manifest.json").write_text(json.dumps(m))

    def newer_release(p):
        m = json.loads((p / "manifest.json").read_text())
        m["embtables_version"] = "99.0.0"
        (p / "manifest.json").write_text(json.dumps(m))

    cases = [("flip", flip, "sha256"), ("drop", drop, f"tensor '{user}' is missing"),
             ("newer", newer, "newer than this embtables"), ("release", newer_release, "embtables 99.0.0"),
             ("nomanifest", lambda p: (p / "manifest.json").unlink(), "never finished"),
             ("vocab", lambda p: (p / "vocab" / "user.parquet").write_bytes(b"x"), r"vocab/user\.parquet.*sha256"),
             ("json", lambda p: (p / "manifest.json").write_text("{"), "unreadable manifest")]
    for name, edit, message in cases:
        with pytest.raises(ExportError, match=message):
            embtables.load(broken(name, edit))
    # Unverified loads still catch a changed tensor shape or a missing file.
    with pytest.raises(ExportError, match="missing"):
        embtables.load(broken("nodense", lambda p: (p / "dense.safetensors").unlink()), verify=False)


def test_failed_export_leaves_nothing_and_keeps_the_old_one(tmp_path, full_run, monkeypatch):
    out = export_run(full_run[0], tmp_path / "exp")
    before = (out / "manifest.json").read_text()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(export_mod, "save_file", boom)
    with pytest.raises(OSError):
        export_run(full_run[0], tmp_path / "exp", quantize="int8")
    with pytest.raises(OSError):
        export_run(full_run[0], tmp_path / "fresh")
    assert (out / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an export"):
        export_run(full_run[0], tmp_path / "busy")


def test_cli_export_and_predict(tmp_path, full_run, data, capsys):
    tmp, _ = data
    exp, pred, met = tmp_path / "e", tmp_path / "p.parquet", tmp_path / "m.json"
    assert cli_main(["export", str(full_run[0]), "--out", str(exp), "--quantize", "int4"]) == 0
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # so that only --threads can make it 1
    try:
        assert cli_main(["predict", str(exp), str(tmp / "valid.parquet"), "--out", str(pred),
                         "--metrics", str(met), "--quiet", "--batch-size", "100", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    metrics = json.loads(met.read_text())
    assert metrics["rows"] == 800 and pq.read_table(pred).num_rows == 800 and metrics["rows_per_sec"] > 0
    assert metrics["threads"] == 1
    assert cli_main(["predict", str(tmp_path / "nope"), str(tmp / "valid.parquet"), "--out", str(pred),
                     "--force"]) == 2
    assert "no such export" in capsys.readouterr().err


def test_shared_tables_serve_like_a_manual_lookup():
    """A method whose remap keys share one table (multiplexed) is served key by key, even
    before the training collection runs it."""
    from embtables.serving.inference import InferenceModel
    from embtables.serving.lookup import ServingLookup

    cls = method_class("multiplexed")
    m = cls.solve_group([FeatureSpec("a", 300), FeatureSpec("b", 200)], 8, 4.0)[0]
    tensors, entry = m.export()
    entry["lookups"] = [list(p) for p in m.lookups()]
    weights = {t.name: torch.randn(t.rows, t.dim) for t in m.physical_tables()}
    tables = [{"name": t.name, "rows": t.rows, "dim": t.dim, "precision": "none"} for t in m.physical_tables()]
    lookup = ServingLookup(tables, [{"weight": weights[t["name"]]} for t in tables], entry["lookups"])
    manifest = {"features": [{"name": "a"}, {"name": "b"}], "dense": [], "label": "y", "methods": [entry]}
    model = InferenceModel(manifest, [cls.from_export(entry, tensors)], lookup, torch.nn.Identity(), ".")
    kjt = KeyedJaggedTensor(keys=["a", "b"], values=torch.tensor([1, 2, 3, 299, 5, 7]),
                            lengths=torch.tensor([1, 2, 0, 2, 1, 0]))
    physical, table_of, pooled = m.remap(kjt), dict(m.lookups()), {}
    for key in physical.keys():  # each bag's rows summed by hand
        bag = physical[key]
        ends = bag.lengths().cumsum(0).tolist()
        rows = [bag.values()[a:b] for a, b in zip([0] + ends[:-1], ends)]
        pooled[key] = torch.stack([weights[table_of[key]][r].sum(0) for r in rows])
    assert torch.allclose(model.embed(kjt), m.combine(pooled), atol=1e-6)
