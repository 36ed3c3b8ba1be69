"""mixed_dim: block boundaries, power-rule dims, exact outputs, budgets, both lookup backends."""
import math

import numpy as np
import pytest
import torch

from embtables.collection import build_embeddings
from embtables.methods.mixed_dim import MixedDim, geometric_ends
from embtables.specs import FeatureSpec

from helpers import assert_a_step_changes_every_table, assert_torch_and_fbgemm_agree, kjt, needs_fbgemm, zipf


# 16 ids in frequency order: 2 heavy (100 each), 4 medium (10), 10 light (1); total 250.
COUNTS = np.array([100] * 2 + [10] * 4 + [1] * 10)
HAND = FeatureSpec("hand", 16, counts=COUNTS)


def test_geometric_boundaries_by_hand():
    assert geometric_ends(10_000, 4) == [10, 100, 1000, 10_000]
    assert geometric_ends(100_000, 4) == [18, 316, 5623, 100_000]  # 10^1.25, 10^2.5, 10^3.75
    assert geometric_ends(3, 4) == [1, 2, 3]  # 3^¼ → 1, 3^½ → 2, 3^¾ → 2 (merged), 3
    assert geometric_ends(7, 1) == [7]


def test_dims_follow_the_power_rule_by_hand():
    # p = mean access probability per block: [100, 10, 1] / 250; α = ½ → p^α = [.632, .2, .0632].
    # d = 8. Plan [8, 3, 1] costs (2·8 + 4·3 + 10·1 + projections 3·8 + 1·8)·4 = 280 bytes and
    # holds for λ ∈ [1/.0632, 3.5/.2) = [15.81, 17.5); the next plan (block 1 → 4) costs 328.
    m = MixedDim.solve(HAND, 8, ratio=512 / 300, boundaries=[2, 6, 16], alpha=0.5,
                       fill=False)
    h = m.hyperparameters()
    assert h["block_probability"] == pytest.approx([0.4, 0.04, 0.004])
    assert [(b["start"], b["end"], b["rows"], b["dim"]) for b in h["blocks"]] == [
        (0, 2, 2, 8), (2, 6, 4, 3), (6, 16, 10, 1)]
    assert math.sqrt(1 / 0.004) <= h["lambda"] < 3.5 / math.sqrt(0.04)
    assert m.embedding_bytes() == 280
    assert set(m.projections) == {"1", "2"}  # the full-dim head block has no projection
    # fill spends the leftover: at 330 bytes block 1 rises to the head's dim 8, which drops its
    # projection: 2·8 + 4·8 + 10·1 + 1·8 = 66 floats = 264 bytes (block 2 → 2 would need 16 + 10 more).
    filled = MixedDim.solve(HAND, 8, ratio=512 / 330, boundaries=[2, 6, 16], alpha=0.5)
    assert filled.dims == [8, 8, 1] and filled.embedding_bytes() == 264


def test_leftover_goes_to_a_prefix_of_the_block_that_could_grow():
    # 1000 uniform ids, d = 8, budget 1600 floats: the power rule gives dim 1 (1000 + 8 floats);
    # dim 2 for a prefix of s ids costs s more floats + its 2×8 projection: s = 1600 − 1008 − 16.
    f = FeatureSpec("u", 1000)
    m = MixedDim.solve(f, 8, ratio=1000 * 8 / 1600, boundaries=[1000])
    assert (m.ends, m.dims, m.rows) == ([576, 1000], [2, 1], [576, 424])
    assert m.embedding_bytes() == 1600 * 4


def test_below_min_dim_a_block_shares_rows_instead_of_shrinking():
    # 1000 uniform ids, d = 8, budget 2032 floats: 1-dim rows would fit all ids (1000 + 8);
    # with min_dim 4 the block keeps 4 dims on 500 shared rows: 500·4 + 4·8 = 2032 floats.
    f = FeatureSpec("u", 1000)
    m = MixedDim.solve(f, 8, ratio=8000 / 2032, boundaries=[1000], min_dim=4)
    assert (m.dims, m.rows) == ([4], [500]) and m.embedding_bytes() == 2032 * 4
    assert MixedDim.solve(f, 8, ratio=8000 / 2032, boundaries=[1000]).dims == [2]  # min_dim 1: 2 dims


def test_feature_mode_gives_each_feature_one_dim_by_the_power_rule():
    feats = [FeatureSpec("a", 4), FeatureSpec("b", 64), FeatureSpec("c", 1024)]
    # p = 1/rows, α = ½: x = λ/√rows = λ·[1/2, 1/8, 1/32]. d = 16, full = 1092·16·4 = 69888 bytes.
    # λ = 32 → x = [16, 4, 1]: bytes = 4·16 + 64·4 + 1024·1 + (4 + 1)·16 = 1424 floats = 5696 bytes;
    # raising c to 2 needs λ ≥ 48 (x_b = 6, so b = 6: 4·16 + 64·6 + 1024·2 + 8·16 = 2624 floats).
    ms = MixedDim.solve_group(feats, 16, ratio=69888 / 6000, mode="feature", alpha=0.5,
                              fill=False)
    assert [m.dims for m in ms] == [[16], [4], [1]]
    assert [m.rows for m in ms] == [[4], [64], [1024]]
    assert sum(m.embedding_bytes() for m in ms) == 5696
    assert 32 <= ms[0].hyperparameters()["lambda"] < 48


def test_one_budget_for_the_group_goes_where_each_id_is_read_most():
    # Uniform features: an id of `a` is read 1/200 of the time, one of `b` 1/20000, so with one λ
    # a's blocks get (100)^0.3 ≈ 4× the floats per id of b's; alone each would get 16/20 per id.
    a, b = FeatureSpec("a", 200), FeatureSpec("b", 20_000)
    full = a.full_bytes(16) + b.full_bytes(16)
    shared = MixedDim.solve_group([a, b], 16, 20, mode="block")
    assert sum(m.embedding_bytes() for m in shared) <= full / 20
    assert shared[0].embedding_bytes() > a.full_bytes(16) / 20
    assert min(shared[0].dims[1:]) > max(shared[1].dims[1:])
    assert shared[0].dims[0] == shared[1].dims[0] == 16  # every feature's head block keeps d
    alone = MixedDim.solve_group([a, b], 16, 20, mode="block", share_budget=False)
    assert all(m.embedding_bytes() <= f.full_bytes(16) / 20 for m, f in zip(alone, (a, b)))


def test_rounding_to_multiples_of_four_only_within_budget():
    f = zipf("z", 5000)
    for ratio in (2, 3, 5):
        m = MixedDim.solve(f, 16, ratio, align=4)
        assert all(d < 4 or d % 4 == 0 for d in m.dims), m.dims
        assert m.embedding_bytes() <= f.full_bytes(16) / ratio


def build(methods, features, backend="torch", seed=0):
    return build_embeddings(features, 16, methods, backend=backend, seed=seed)


def expected_vectors(m, coll, bags, weights=None):
    """Σ over the bag of (block table row) @ P_k, from the raw weights, per sample."""
    tables = {t.name: w for t, w in zip(coll.tables, coll.lookup.table_weights())}
    out = []
    for b, bag in enumerate(bags):
        v = torch.zeros(16)
        for j, i in enumerate(bag):
            k = next(k for k, e in enumerate(m.ends) if i < e)
            row = (i - m.starts[k]) % m.rows[k]
            x = tables[m.table_name(k)][row]
            if str(k) in m.projections:
                x = x @ m.projections[str(k)].detach()
            v += x * (1.0 if weights is None else weights[b][j])
        out.append(v)
    return torch.stack(out)


@pytest.mark.parametrize("ratio", [4, 40])  # 40: the tail blocks share rows
def test_output_is_block_row_times_projection_with_multi_hot_and_empty_bags(ratio):
    f = zipf("z", 400)
    m = MixedDim.solve(f, 16, ratio, mode="block")
    assert len(m.dims) == 4 and any(d < 16 for d in m.dims)
    if ratio == 40:
        assert any(r < e - s for r, s, e in zip(m.rows, m.starts, m.ends))
    coll = build([m], [f])
    bags = [[0], [5], [50], [399], [0, 3, 3, 200, 399], [], [17, 18, 317]]
    with torch.no_grad():
        out = coll(kjt({"z": bags}))
    assert out.shape == (len(bags), 1, 16)
    torch.testing.assert_close(out[:, 0], expected_vectors(m, coll, bags), rtol=1e-5, atol=1e-7)
    assert torch.all(out[5] == 0)
    weights = [[0.5], [2.0], [1.0], [-1.0], [1, 2, 3, 4, 5], [], [0.1, 0.2, 0.3]]
    with torch.no_grad():
        out_w = coll(kjt({"z": bags}, {"z": weights}))
    torch.testing.assert_close(out_w[:, 0], expected_vectors(m, coll, bags, weights), rtol=1e-5, atol=1e-7)


@needs_fbgemm
def test_torch_and_fbgemm_backends_agree_in_a_dlrm_like_use():
    features = [zipf("a", 1000), zipf("b", 300, 0.8), FeatureSpec("c", 50)]
    torch.manual_seed(0)
    methods = [MixedDim.solve(features[0], 16, 10), MixedDim.solve(features[1], 16, 4, align=4),
               MixedDim.solve(features[2], 16, 3)]
    assert_torch_and_fbgemm_agree(lambda backend: build(methods, features, backend, 1), features)


def test_gradients_reach_tables_and_projections():
    features = [zipf("a", 1000), zipf("b", 300)]
    methods = MixedDim.solve_group(features, 16, 8)
    assert_a_step_changes_every_table(build(methods, features), features)
    params = [p for m in methods for p in m.parameters()]
    assert params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_initial_scale_matches_a_full_table():
    f = FeatureSpec("u", 40_000)  # uniform: every block gets the same (small) dim
    m = MixedDim.solve(f, 16, 10, boundaries=[20_000, 40_000])
    assert all(d < 16 for d in m.dims)
    coll = build([m], [f])
    with torch.no_grad():
        out = coll(kjt({"u": [[i] for i in range(0, 40_000, 7)]}))
    assert 0.008 < float(out.std()) < 0.012


@pytest.mark.parametrize("ratio", [2, 10, 100, 1000])
def test_budget_holds_and_is_used(ratio):
    for f in (zipf("z", 100_000), FeatureSpec("u", 100_000), zipf("s", 5_000, 0.7)):
        m = MixedDim.solve(f, 16, ratio)
        budget = f.full_bytes(16) / ratio
        assert 0.95 * budget <= m.embedding_bytes() <= budget, (f.name, m.hyperparameters())
        if ratio <= 10:  # below ratio d every id keeps its own row, in blocks; the head keeps d
            assert m.rows == m.sizes and len(m.dims) > 1 and m.dims[0] == 16
        else:  # ids share rows: auto mode makes it one block
            assert len(m.dims) == 1 and m.hyperparameters()["mode"] == "feature"
        if f.counts is not None and ratio <= 100:  # block mode keeps the head at d where it fits
            b = MixedDim.solve(f, 16, ratio, mode="block")
            assert b.embedding_bytes() <= budget and b.dims[0] == 16 and b.rows[0] == b.sizes[0]


@pytest.mark.parametrize("ratio", [2, 10, 100, 1000])
def test_budget_for_tiny_and_huge_features(ratio):
    tiny = FeatureSpec("tiny", 3, counts=np.array([5, 2, 1]))
    m = MixedDim.solve(tiny, 16, ratio)
    smallest = (1 + 16) * 4  # one shared 1-dim row and its projection
    assert m.embedding_bytes() <= max(tiny.full_bytes(16) / ratio, smallest)
    huge = FeatureSpec("huge", 10_000_000)  # never build a collection of this
    m = MixedDim.solve(huge, 16, ratio)
    assert 0.95 * huge.full_bytes(16) / ratio <= m.embedding_bytes() <= huge.full_bytes(16) / ratio
    group = MixedDim.solve_group([tiny, huge, zipf("z", 1000)], 16, ratio, mode="feature")
    full = tiny.full_bytes(16) + huge.full_bytes(16) + 1000 * 16 * 4
    assert sum(g.embedding_bytes() for g in group) <= full / ratio


def test_embedding_bytes_counts_built_tables_and_projections():
    features = [zipf("a", 2000), FeatureSpec("b", 500)]
    methods = MixedDim.solve_group(features, 16, 7) + []
    coll = build(methods, features)
    tables = sum(w.numel() * w.element_size() for w in coll.lookup.table_weights())
    own = sum(t.numel() * t.element_size() for m in methods for t in m.state_dict().values())
    assert own > 0
    assert coll.embedding_bytes() == tables + own
    assert all(m.hyperparameters()["blocks"] for m in methods)


def test_export_round_trip_rebuilds_the_same_method():
    import json

    f = zipf("z", 3000)
    for m in (MixedDim.solve(f, 16, 10), MixedDim.solve_group([f], 16, 10, mode="feature")[0]):
        tensors, entry = m.export()
        back = MixedDim.from_export(json.loads(json.dumps(entry)), tensors)
        assert back.physical_tables() == m.physical_tables()
        ids = kjt({"z": [[0, 2999], [], [17, 500, 1500]]})
        a, b = m.remap(ids), back.remap(ids)
        assert a.keys() == b.keys() and torch.equal(a.values(), b.values()) and torch.equal(a.lengths(), b.lengths())
        pooled = {t.name: torch.randn(3, t.dim) for t in m.physical_tables()}
        assert torch.equal(m.combine(pooled), back.combine(pooled))
