"""low_rank: factorized E = A·B trained end to end, and post-hoc frequency-weighted PCA."""
import numpy as np
import pytest
import torch

from embtables.collection import build_embeddings
from embtables.errors import ConfigError
from embtables.methods.low_rank import LowRank
from embtables.specs import FeatureSpec

from helpers import assert_a_step_changes_every_table, assert_torch_and_fbgemm_agree, kjt, needs_fbgemm, zipf


def build(methods, features, dim=16, backend="torch", seed=0):
    return build_embeddings(features, dim, methods, backend=backend, seed=seed)


def load_tables(coll, tables: dict):
    with torch.no_grad():
        for t, w in zip(coll.tables, coll.lookup.table_weights()):
            if t.name in tables:
                w.copy_(tables[t.name])


BAGS = [[0], [7], [999], [0, 3, 3, 500, 999], [], [17, 18]]
WEIGHTS = [[0.5], [2.0], [1.0], [1, 2, 3, 4, 5], [], [-1.0, 0.25]]


# --- factorized ------------------------------------------------------------------------------
def test_rank_from_the_ratio_by_hand():
    f = FeatureSpec("u", 1000)
    # budget = 1000·16/4 = 4000 floats; r(n + d) = 1016r ≤ 4000 → r = 3.
    pure = LowRank.solve(f, 16, 4, max_shared_traffic=0)
    assert (pure.rank, pure.rows) == (3, 1000) and pure.embedding_bytes() == 3 * 1016 * 4
    # r = 4 fits with (4000 − 4·16)/4 = 984 rows: the 16 rarest ids (1.6% of uniform traffic)
    # would share, more than the default 1% allows.
    assert (LowRank.solve(f, 16, 4).rank, LowRank.solve(f, 16, 4).rows) == (3, 1000)
    m = LowRank.solve(f, 16, 4, max_shared_traffic=0.02)
    assert (m.rank, m.rows) == (4, 984) and m.embedding_bytes() == 4000 * 4
    assert LowRank.solve(f, 16, 4, rank=2).rows == 1000
    assert LowRank.solve(f, 16, 1).rank == 15  # 15·1016 ≤ 16000; rank d would never pay


@pytest.mark.parametrize("ratio", [3, 100])  # 100: rank 1 and rows shared (id mod rows)
def test_factorized_output_is_factor_row_times_basis(ratio):
    f = FeatureSpec("u", 1000)
    m = LowRank.solve(f, 16, ratio)
    assert (m.rows < 1000) == (ratio == 100)
    coll = build([m], [f])
    a = coll.lookup.table_weights()[0]
    b = m.basis.detach()
    for weights in (None, WEIGHTS):
        with torch.no_grad():
            out = coll(kjt({"u": BAGS}, None if weights is None else {"u": weights}))
        expected = torch.stack([sum(((1.0 if weights is None else weights[s][j]) * a[i % m.rows] @ b
                                     for j, i in enumerate(bag)), torch.zeros(16)) for s, bag in enumerate(BAGS)])
        assert out.shape == (len(BAGS), 1, 16)
        torch.testing.assert_close(out[:, 0], expected, rtol=1e-5, atol=1e-7)
        assert torch.all(out[4] == 0)


@needs_fbgemm
def test_torch_and_fbgemm_backends_agree_in_a_dlrm_like_use():
    features = [zipf("a", 2000), FeatureSpec("b", 300), FeatureSpec("c", 50)]
    torch.manual_seed(0)
    methods = [LowRank.solve(features[0], 16, 2), LowRank.solve(features[1], 16, 5),
               LowRank.from_trained(features[2], torch.randn(50, 16), rank=8)]
    fused = assert_torch_and_fbgemm_agree(lambda backend: build(methods, features, backend=backend, seed=2),
                                          features)
    assert "torch" in fused.lookup.backends


def test_gradients_reach_every_table_and_the_basis():
    features = [zipf("a", 2000), FeatureSpec("b", 300)]
    methods = [LowRank.solve(features[0], 16, 8), LowRank.from_trained(features[1], torch.randn(300, 16), rank=3)]
    assert_a_step_changes_every_table(build(methods, features), features)
    assert all(m.basis.grad is not None and m.basis.grad.abs().sum() > 0 for m in methods)


def test_initial_scale_matches_a_full_table():
    f = FeatureSpec("u", 20_000)
    m = LowRank.solve(f, 16, 5)
    coll = build([m], [f])
    with torch.no_grad():
        out = coll(kjt({"u": [[i] for i in range(0, 20_000, 3)]}))
    assert 0.008 < float(out.std()) < 0.012


@pytest.mark.parametrize("ratio", [2, 10, 100, 1000])
def test_budget_holds_for_small_large_tiny_and_huge_features(ratio):
    for f in (zipf("z", 100_000), FeatureSpec("u", 5_000), FeatureSpec("huge", 10_000_000)):
        m = LowRank.solve(f, 16, ratio)
        budget = f.full_bytes(16) / ratio
        assert m.embedding_bytes() <= budget
        assert m.embedding_bytes() >= 0.6 * budget  # integer ranks: r = 1 where 1.6 would fit
    tiny = FeatureSpec("tiny", 3)  # its floor, one 1-dim row + basis, is 68 bytes of its 192
    if ratio > tiny.full_bytes(16) / 68:
        with pytest.raises(ConfigError, match="out of reach for method 'low_rank' on 'tiny'"):
            LowRank.solve(tiny, 16, ratio)
    # In a group the large feature pays for the tiny one's floor, and the sum meets the budget.
    group = [zipf("z", 100_000), tiny]
    methods = LowRank.solve_group(group, 16, ratio)
    assert sum(m.embedding_bytes() for m in methods) <= sum(f.full_bytes(16) for f in group) / ratio


def test_embedding_bytes_counts_built_tables_and_basis():
    features = [zipf("a", 2000), FeatureSpec("b", 300)]
    methods = [LowRank.solve(features[0], 16, 6), LowRank.from_trained(features[1], torch.randn(300, 16), ratio=3)]
    coll = build(methods, features)
    tables = sum(w.numel() * w.element_size() for w in coll.lookup.table_weights())
    own = sum(t.numel() * t.element_size() for m in methods for t in m.state_dict().values())
    assert coll.embedding_bytes() == tables + own
    # post-hoc at ratio 3: (300·16/3 − 16) // (300 + 16) = 5; bytes = (300·5 + 5·16 + 16)·4
    assert methods[1].rank == 5 and methods[1].embedding_bytes() == (300 * 5 + 5 * 16 + 16) * 4


# --- post-hoc PCA ----------------------------------------------------------------------------
def trained_like(n, d, seed=0):
    """A table with a mean offset and an anisotropic spread, like trained embeddings."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -2, d)
    return torch.randn(n, d, generator=g) * scales + torch.linspace(-0.5, 0.5, d)


def test_full_rank_pca_reproduces_the_table_through_the_collection():
    f = zipf("z", 1000)
    e = trained_like(1000, 16)
    m = LowRank.from_trained(f, e, rank=16)
    coll = build([m], [f])
    load_tables(coll, m.initial_tables())
    for weights in (None, WEIGHTS):
        with torch.no_grad():
            out = coll(kjt({"z": BAGS}, None if weights is None else {"z": weights}))[:, 0]
        expected = torch.stack([sum(((1.0 if weights is None else weights[s][j]) * e[i] for j, i in enumerate(bag)),
                                    torch.zeros(16)) for s, bag in enumerate(BAGS)])
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)  # the L·μ term included


def weighted_eigenvalues(e: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Eigenvalues (descending) of Σ p_i (e_i − μ)(e_i − μ)ᵀ, by numpy's weighted covariance."""
    cov = np.cov(e.T, aweights=p, bias=True)
    return np.sort(np.linalg.eigvalsh(cov))[::-1]


@pytest.mark.parametrize("k", [1, 4, 10])
def test_reconstruction_error_is_the_weighted_sum_of_dropped_eigenvalues(k):
    f = zipf("z", 800, 0.9)
    e = trained_like(800, 16, seed=k)
    m = LowRank.from_trained(f, e, rank=k)
    t = m.initial_tables()
    rebuilt = t[m.factor_name] @ m.basis.detach() + t[m.mean_name]
    p = f.counts / f.counts.sum()
    err = float((p * ((e - rebuilt).double() ** 2).sum(1).numpy()).sum())
    dropped = weighted_eigenvalues(e.double().numpy(), p)[k:].sum()
    assert err == pytest.approx(dropped, rel=1e-4)
    assert m.hyperparameters()["dropped_variance"] == pytest.approx(dropped, rel=1e-6)


def test_frequency_weighting_picks_the_heavy_rows_direction():
    # 10 heavy rows spread along x (±1), 90 light rows spread wider along y (±3).
    e = torch.zeros(100, 4)
    e[:10, 0] = torch.tensor([1.0, -1.0] * 5)
    e[10:, 1] = torch.tensor([3.0, -3.0] * 45)
    heavy = FeatureSpec("h", 100, counts=np.array([1000] * 10 + [1] * 90))
    weighted = LowRank.from_trained(heavy, e, rank=1).basis.detach()[0].abs()
    plain = LowRank.from_trained(FeatureSpec("h", 100), e, rank=1).basis.detach()[0].abs()
    torch.testing.assert_close(weighted, torch.tensor([1.0, 0, 0, 0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(plain, torch.tensor([0, 1.0, 0, 0]), atol=1e-6, rtol=0)


def test_post_hoc_rank_from_ratio_and_errors():
    f = FeatureSpec("u", 1000)
    e = trained_like(1000, 16)
    # (1000·16/4 − 16) // (1000 + 16) = 3
    assert LowRank.from_trained(f, e, ratio=4).rank == 3
    assert LowRank.from_trained(f, e, ratio=1000).rank == 1
    with pytest.raises(ValueError):
        LowRank.from_trained(f, e)
    with pytest.raises(ValueError):
        LowRank.from_trained(FeatureSpec("v", 7), e, rank=2)
    with pytest.raises(ValueError):
        LowRank.solve(f, 16, 4).initial_tables()


# --- embtables compress: a trained full run → post-hoc low-rank run --------------------------
@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    from embtables.config import load_config
    from embtables.pipelines.data.ingest_synth import ingest
    from embtables.pipelines.train.local import train

    root = tmp_path_factory.mktemp("compress")
    data = ingest(root / "synth", preset="tiny", rows=6000, seed=1)
    cfg = root / "cfg.yaml"
    cfg.write_text(f"data: {{train: {data}}}\nmodel: {{name: dlrm, bottom_mlp: [8], top_mlp: [16]}}\n"
                   "embedding: {dim: 8, backend: torch}\ntrain: {batch_size: 256, epochs: 1, threads: 1}\n")
    train(load_config(cfg), root / "full", progress=False)
    return root


def test_compress_writes_a_run_that_reloads_with_both_metrics(full_run):
    import json

    from embtables.pipelines.cli.main import build_parser
    from embtables.errors import EmbtablesError
    from embtables.pipelines.serve.compress import compress
    from embtables.pipelines.train.evaluate import evaluate
    from embtables.pipelines.train.build import load_run

    args = build_parser().parse_args(["compress", str(full_run / "full"), "--rank", "2", "--out", "x"])
    assert args.func.__name__ == "cmd_compress" and args.rank == 2 and args.ratio is None
    out = compress(full_run / "full", rank=2, out=full_run / "lr2")
    m = json.loads((out / "metrics.json").read_text())
    source = json.loads((full_run / "full" / "metrics.json").read_text())
    assert m["original_auc"] == pytest.approx(source["auc"], abs=1e-9)
    assert m["post_hoc"] and all(v["rank"] == 2 for v in m["post_hoc"].values())
    assert m["compression_ratio"] > 1.5 and m["embedding_bytes"] < source["embedding_bytes"]
    assert abs(m["auc"] - m["original_auc"]) < 0.1
    # The new run is an ordinary run: rebuilt from its config + checkpoint, same AUC.
    model, cfg, inputs = load_run(out)
    assert "low_rank" in {x.name for x in model.embeddings.methods}
    again = evaluate(model, inputs.dataset, "valid", inputs.dense_index, 4096)
    assert again["auc"] == pytest.approx(m["auc"], abs=1e-9)
    by_ratio = json.loads((compress(full_run / "full", ratio=3, out=full_run / "r3") / "metrics.json").read_text())
    assert by_ratio["embedding_bytes"] <= by_ratio["full_embedding_bytes"] / 3 and by_ratio["budget_met"]
    with pytest.raises(EmbtablesError, match="not empty"):
        compress(full_run / "full", rank=2, out=full_run / "lr2")
    with pytest.raises(EmbtablesError, match="exactly one"):
        compress(full_run / "full", out=full_run / "none")
    with pytest.raises(EmbtablesError, match="full tables"):
        compress(out, rank=1, out=full_run / "again")
    assert not (full_run / "again").exists() and not (full_run / "none").exists()


def test_export_round_trip_rebuilds_the_same_method():
    import json

    f = zipf("z", 3000)
    for m in (LowRank.solve(f, 16, 10), LowRank.from_trained(f, trained_like(3000, 16), rank=3)):
        tensors, entry = m.export()
        back = LowRank.from_export(json.loads(json.dumps(entry)), tensors)
        assert back.physical_tables() == m.physical_tables()
        ids = kjt({"z": [[0, 2999], [], [17, 500, 1500]]})
        a, b = m.remap(ids), back.remap(ids)
        assert a.keys() == b.keys() and torch.equal(a.values(), b.values()) and torch.equal(a.lengths(), b.lengths())
        pooled = {t.name: torch.randn(3, t.dim) for t in m.physical_tables()}
        assert torch.equal(m.combine(pooled), back.combine(pooled))
