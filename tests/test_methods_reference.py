"""Reference-faithful options (issue 13): each reproduces the papers' reference code, checked
against numbers worked out from the reference formulas (never by calling our code), and runs
through every lookup backend and the export.

Criteo Kaggle: the 26 categorical cardinalities of the DLRM reference (its README / data
loader output for the Kaggle Display Advertising Challenge set).
"""
import math

import pytest
import torch

from embtables.collection import build_embeddings
from embtables.errors import ConfigError
from embtables.kernels import cpu_fused_available, fbgemm_available
from embtables.methods.build import build_methods
from embtables.methods.full import Full
from embtables.methods.mixed_dim import MixedDim
from embtables.methods.multiplexed import Multiplexed
from embtables.methods.qr import QuotientRemainder
from embtables.specs import FeatureSpec

from helpers import kjt, random_batch

CRITEO_KAGGLE = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
                 27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572]

# DLRM's md_solver(n, alpha, d0, round_dim): the smallest table (3 rows) keeps d0, every other
# gets round(d0 · (3 / n)^alpha), at least 1; round_dim then takes 2^round(log2 d). Worked out
# per table, e.g. α=0.3, d0=16, n=1460: 16 · (3/1460)^0.3 = 2.5002 → 3 (→ 4 rounded to a power of 2).
MD_SOLVER_DIMS = {
    (0.3, 16, False): [3, 3, 1, 1, 4, 9, 1, 3, 16, 1, 2, 1, 2, 8, 1, 1, 11, 2, 2, 15, 1, 9, 10, 1, 6, 1],
    (0.3, 16, True): [4, 4, 1, 1, 4, 8, 1, 4, 16, 1, 2, 1, 2, 8, 1, 1, 8, 2, 2, 16, 1, 8, 8, 1, 8, 1],
    (0.2, 32, True): [8, 8, 2, 2, 16, 16, 8, 8, 32, 4, 8, 2, 8, 16, 8, 2, 32, 8, 8, 32, 2, 16, 32, 4, 16, 4],
}

# DLRM's QREmbeddingBag with --qr-collisions 4 (--qr-threshold 200: smaller tables stay plain):
# the quotient table has ceil(n / 4) rows, the remainder table 4; None = a plain table.
QR_QUOTIENT_ROWS_C4 = [365, 146, 2532807, 550652, 77, None, 3130, 159, None, 23287, 1421, 2087899, 799,
                       None, 3748, 1365327, None, 1413, 544, None, 1761637, None, None, 71546, None, 35643]

BACKENDS = ["torch", "cpu_fused", "fbgemm"]


def criteo_features():
    return [FeatureSpec(f"cat_{i}", n) for i, n in enumerate(CRITEO_KAGGLE)]


def from_config(features, dim, compression):
    return build_methods(features, {"dim": dim, "compression": compression, "features": {}, "init_std": 0.01})


def skip_unbuilt(backend):
    if backend == "fbgemm" and not fbgemm_available():
        pytest.skip("fbgemm_gpu does not import")
    if backend == "cpu_fused" and not cpu_fused_available():
        pytest.skip("cpu_fused kernels are not built")


def collection(features, methods, backend, dim=16):
    return build_embeddings(features, dim, methods, backend=backend, seed=3)


def assert_backends_agree(features, make_methods, batch):
    """The same methods on every backend give the torch reference's output."""
    def make():
        torch.manual_seed(0)  # the same dense parameters (projections) each time
        return make_methods()

    with torch.no_grad():
        expected = collection(features, make(), "torch")(batch)
        for backend in BACKENDS[1:]:
            if backend == "fbgemm" and not fbgemm_available() or backend == "cpu_fused" and not cpu_fused_available():
                continue
            got = collection(features, make(), backend)(batch)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    return expected


def assert_export_round_trips(features, methods, batch, dim=16):
    """export → from_export → the serving model embeds exactly as the training collection."""
    from embtables.serving.inference import InferenceModel
    from embtables.serving.lookup import ServingLookup

    coll = collection(features, methods, "torch", dim)
    weights = dict(zip((t.name for t in coll.tables), coll.lookup.table_weights()))
    rebuilt, entries = [], []
    for m in methods:
        tensors, entry = m.export()
        entry["lookups"] = [list(p) for p in m.lookups()]
        entries.append(entry)
        rebuilt.append(type(m).from_export(entry, tensors))
        assert rebuilt[-1].hyperparameters() == m.hyperparameters()
    tables = [{"name": t.name, "rows": t.rows, "dim": t.dim, "precision": "none"} for t in coll.tables]
    lookup = ServingLookup(tables, [{"weight": weights[t["name"]]} for t in tables],
                           [p for e in entries for p in e["lookups"]])
    manifest = {"features": [{"name": f.name} for f in features], "dense": [], "label": "y", "methods": entries}
    model = InferenceModel(manifest, rebuilt, lookup, torch.nn.Identity(), ".")
    with torch.no_grad():
        torch.testing.assert_close(model.embed(batch), coll(batch), rtol=1e-6, atol=1e-7)


# --- mixed_dim: mode "reference" = DLRM's md_solver ---------------------------------------------
@pytest.mark.parametrize("alpha,base,round_dims", list(MD_SOLVER_DIMS))
def test_mixed_dim_reference_mode_gives_md_solver_dims_on_criteo(alpha, base, round_dims):
    methods = from_config(criteo_features(), base, {"method": "mixed_dim", "mode": "reference", "alpha": alpha,
                                                    "round_dims": round_dims})
    assert [m.dims for m in methods] == [[d] for d in MD_SOLVER_DIMS[(alpha, base, round_dims)]]
    for m, n in zip(methods, CRITEO_KAGGLE):
        assert m.rows == [n] and m.ends == [n]  # one block a feature, no row sharing
        assert (str(0) in m.projections) == (m.dims[0] < base)  # projections only below the base dim
        h = m.hyperparameters()
        assert (h["mode"], h["alpha"], h["round_dims"]) == ("reference", alpha, round_dims)


def test_mixed_dim_reference_mode_errors():
    feats = [FeatureSpec("a", 3), FeatureSpec("b", 1000)]
    with pytest.raises(ConfigError, match="ratio"):
        MixedDim.solve_group(feats, 16, 4.0, mode="reference")
    with pytest.raises(ConfigError, match="power of 2"):  # 12 rounds up to 16 > dim 12
        MixedDim.solve_group(feats, 12, 1.0, mode="reference", round_dims=True)


def test_mixed_dim_reference_mode_serves_on_every_backend_and_exports():
    feats = [FeatureSpec("a", 3), FeatureSpec("b", 40), FeatureSpec("c", 3000)]
    make = lambda: MixedDim.solve_group(feats, 16, 1.0, mode="reference", alpha=0.3, round_dims=True)  # noqa: E731
    # 16·(3/40)^0.3 = 7.36 → 7 → 2^round(2.81) = 8;  16·(3/3000)^0.3 = 2.01 → 2 → 2
    assert [m.dims for m in make()] == [[16], [8], [2]]
    batch = random_batch(feats, 32, 0)
    assert_backends_agree(feats, make, batch)
    assert_export_round_trips(feats, make(), batch)


# --- qr: the reference's sizing, index layout and weights ---------------------------------------
def test_qr_reference_sizing_and_layout_on_criteo():
    methods = from_config(criteo_features(), 16, {"method": "qr", "collisions": 4, "threshold": 200,
                                                  "frequency_aware": False, "weight_both": True})
    for m, n, q_rows in zip(methods, CRITEO_KAGGLE, QR_QUOTIENT_ROWS_C4):
        if q_rows is None:
            assert isinstance(m, Full) and m.physical_tables()[0].rows == n
            continue
        q, r = m.physical_tables()
        assert (q.rows, r.rows, q.dim, r.dim) == (q_rows, 4, 16, 16)
        ids = torch.tensor([0, 1, 3, 4, 7, n - 1])
        q_row, r_row = m.pair(ids)
        assert q_row.tolist() == [0, 0, 0, 1, 1, (n - 1) // 4] and r_row.tolist() == [0, 1, 3, 0, 3, (n - 1) % 4]
        assert m.hyperparameters()["weight_both"] is True


def test_qr_fixed_collisions_refuse_a_ratio():
    with pytest.raises(ConfigError, match="ratio"):
        QuotientRemainder.solve_group([FeatureSpec("a", 1000)], 16, 4.0, collisions=4)
    with pytest.raises(ConfigError, match="threshold"):
        QuotientRemainder.solve_group([FeatureSpec("a", 1000)], 16, 4.0, threshold=200)


@pytest.mark.parametrize("weight_both", [False, True])
def test_qr_mult_weights_one_or_both_bags(weight_both):
    f = FeatureSpec("a", 100)
    make = lambda: [QuotientRemainder(f, 16, 7, op="mult", frequency_aware=False, weight_both=weight_both)]  # noqa: E731
    coll = collection([f], make(), "torch")
    q_w, r_w = coll.lookup.table_weights()
    batch = kjt({"a": [[9], [9, 30]]}, weights={"a": [[2.0], [2.0, 0.5]]})
    out = assert_backends_agree([f], make, batch)[:, 0]
    wr = 2.0 if weight_both else 1.0  # the reference weights R's bag too: w² for one id
    torch.testing.assert_close(out[0], (2.0 * q_w[1]) * (wr * r_w[2]))
    r_bag = (2.0 * r_w[2] + 0.5 * r_w[2]) if weight_both else (r_w[2] + r_w[2])
    torch.testing.assert_close(out[1], (2.0 * q_w[1] + 0.5 * q_w[4]) * r_bag)
    assert_export_round_trips([f], make(), batch)


# --- multiplexed: combiner sum | mean, per-feature chunk counts ---------------------------------
def test_multiplexed_mean_combiner_averages_each_bag():
    feats = [FeatureSpec("a", 500), FeatureSpec("b", 300)]
    make = lambda: [Multiplexed(feats, 16, rows=37, chunks=4, combiner="mean")]  # noqa: E731
    plain = collection(feats, [Multiplexed(feats, 16, rows=37, chunks=4)], "torch")
    bags = {"a": [[1], [1, 2, 2], []], "b": [[5, 9], [7], [3]]}
    out = assert_backends_agree(feats, make, kjt(bags))
    with torch.no_grad():
        single = lambda f, i: plain(kjt({"a": [[i] if f == "a" else []], "b": [[i] if f == "b" else []]}))[0, "ab".index(f)]  # noqa: E731
        torch.testing.assert_close(out[1, 0], (single("a", 1) + 2 * single("a", 2)) / 3)
        torch.testing.assert_close(out[0, 1], (single("b", 5) + single("b", 9)) / 2)
        assert torch.equal(out[2, 0], torch.zeros(16))  # an empty bag stays zero
        weighted = kjt({"a": [[1, 2]], "b": [[7]]}, weights={"a": [[3.0, 1.0]], "b": [[0.5]]})
        w_out = assert_backends_agree(feats, make, weighted)
        torch.testing.assert_close(w_out[0, 0], (3 * single("a", 1) + single("a", 2)) / 4)
        torch.testing.assert_close(w_out[0, 1], single("b", 7))  # w / Σw = 1 for one id
    assert make()[0].hyperparameters()["combiner"] == "mean"
    assert_export_round_trips(feats, make(), kjt(bags))


def test_multiplexed_combiner_must_be_sum_or_mean():
    with pytest.raises(ConfigError, match="combiner"):
        Multiplexed.solve_group([FeatureSpec("a", 500)], 16, 4.0, combiner="max")


def test_multiplexed_per_feature_chunk_counts():
    feats = [FeatureSpec("a", 4000), FeatureSpec("b", 3000), FeatureSpec("c", 2000), FeatureSpec("d", 1000)]
    methods = from_config(feats, 16, {"method": "multiplexed", "ratio": 8, "chunks": {"a": 8, "c": 1}})
    chunks = {f: m.chunks for m in methods for f in m.feature_names}
    assert chunks == {"a": 8, "b": 4, "c": 1, "d": 4}  # unnamed features: the default count
    assert [t.dim for m in methods for t in m.physical_tables()] == [2, 4, 16]  # d / c wide chunks
    full = sum(f.full_bytes(16) for f in feats)
    assert full / 8 * 0.98 <= sum(m.embedding_bytes() for m in methods) <= full / 8
    # A feature's chunk count shows in what it looks up: a single id reads c rows.
    batch = kjt({f.name: [[5]] for f in feats})
    physical = {k: len(m.remap(batch.permute([batch.keys().index(n) for n in m.feature_names])).keys())
                for m in methods for k in [tuple(m.feature_names)]}
    assert physical == {("a",): 8, ("b", "d"): 8, ("c",): 1}
    make = lambda: from_config(feats, 16, {"method": "multiplexed", "ratio": 8, "chunks": {"a": 8, "c": 1},  # noqa: E731
                                           "combiner": "mean"})
    batch = random_batch(feats, 32, 1)
    assert_backends_agree(feats, make, batch)
    assert_export_round_trips(feats, make(), batch)
    with pytest.raises(ConfigError, match="divide"):
        from_config(feats, 16, {"method": "multiplexed", "ratio": 8, "chunks": {"a": 3}})


# --- through the config, training and metrics.json -----------------------------------------------
def test_reference_options_train_and_report_in_metrics(tmp_path):
    import json

    from embtables.config import load_config
    from embtables.pipelines.data.ingest_synth import ingest as ingest_synth
    from embtables.pipelines.train.local import train

    data = ingest_synth(tmp_path / "synth", preset="tiny", rows=3000, seed=1)  # C1..C4: 4, 11, 100, 472 rows
    features = {"C3": {"compression": {"method": "qr", "collisions": 4, "frequency_aware": False,
                                       "weight_both": True}},
                "C4": {"compression": {"method": "multiplexed", "ratio": 4, "combiner": "mean", "chunks": {"C4": 2}}}}
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"data: {{train: {data}}}\nmodel: {{name: dlrm, bottom_mlp: [8], top_mlp: [16]}}\n"
                   "embedding: {dim: 8, backend: torch, compression: {method: mixed_dim, mode: reference, "
                   f"alpha: 0.5, round_dims: true}}, features: {json.dumps(features)}}}\n"
                   "train: {batch_size: 256, epochs: 1, threads: 1}\n")
    metrics = train(load_config(cfg), tmp_path / "run", progress=False)
    reported = json.loads((tmp_path / "run" / "metrics.json").read_text())["embedding"]
    hyper = {tuple(m["features"]): m.get("hyperparameters", {}) for m in reported}
    # md_solver over C1 (4 rows) and C2 (11 rows): 8 and round(8·(4/11)^0.5) = round(4.82) = 5 → 4
    assert [hyper[(f,)]["blocks"][0]["dim"] for f in ("C1", "C2")] == [8, 4]
    assert hyper[("C1",)]["mode"] == "reference"
    assert (hyper[("C3",)]["collisions"], hyper[("C3",)]["q_rows"], hyper[("C3",)]["weight_both"]) == (4, 25, True)
    assert (hyper[("C4",)]["combiner"], hyper[("C4",)]["chunks"]) == ("mean", 2)
    assert metrics["auc"] > 0.5
    # The export (weighted remap next to unweighted ones) serves the trained model's scores.
    from embtables.pipelines.serve.export import export_run
    from embtables.pipelines.serve.predict import predict

    served = predict(export_run(tmp_path / "run", tmp_path / "export"), data, tmp_path / "p.parquet", progress=False)
    assert served["auc"] == pytest.approx(metrics["auc"], abs=1e-4)
