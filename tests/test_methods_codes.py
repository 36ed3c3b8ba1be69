"""qr and binary_code: unique pairs/tuples, bit layouts and vectors by hand, both backends,
gradients, multi-hot and empty bags, budgets and their limits."""
import math

import pytest
import torch

from embtables.collection import build_embeddings
from embtables.errors import ConfigError
from embtables.kernels import RowwiseAdagrad
from embtables.methods.binary_code import BinaryCode
from embtables.methods.build import build_methods
from embtables.methods.qr import QuotientRemainder
from embtables.specs import FeatureSpec

from helpers import kjt, needs_fbgemm

BACKENDS = ["torch", pytest.param("fbgemm", marks=needs_fbgemm)]
RATIOS = [2, 10, 100, 1000]


def collection(features, methods, backend="torch"):
    return build_embeddings(features, methods[0].dim, methods, backend=backend,
                               optimizer=RowwiseAdagrad(lr=0.1), seed=2)


def weights_by_name(emb):
    return {t.name: w for t, w in zip(emb.tables, emb.lookup.table_weights())}


def train_step(emb, ids):
    before = [w.clone() for w in emb.lookup.table_weights()]
    out = emb(ids)
    (out * torch.randn_like(out)).sum().backward()
    return out, [not torch.equal(a, b) for a, b in zip(before, emb.lookup.table_weights())]


# --- qr ------------------------------------------------------------------------------------------
F = FeatureSpec("movie", 1000)
BAGS = {"movie": [[3], [999, 3, 4], [], [0]]}


@pytest.mark.parametrize("frequency_aware", [False, True])
def test_qr_pairs_are_unique_for_every_id(frequency_aware):
    for rows, ratio in ((1000, 10), (12345, 30), (16, 1.5)):
        m = QuotientRemainder.solve(FeatureSpec("f", rows), 8, ratio, frequency_aware=frequency_aware)
        q, r = m.pair(torch.arange(rows))
        assert int(q.max()) < m.q_rows and int(r.max()) < m.r_rows and int(min(q.min(), r.min())) >= 0
        assert len(set(zip(q.tolist(), r.tolist()))) == rows


@pytest.mark.parametrize("op", ["mult", "add", "concat"])
def test_qr_vectors_by_hand_paper_layout(op):
    m = QuotientRemainder(F, 8, collisions=7, op=op, frequency_aware=False)
    emb = collection([F], [m])
    w = weights_by_name(emb)
    Q, R = w["movie/qr_q"], w["movie/qr_r"]
    assert Q.shape == (143, 8 if op != "concat" else 4) and R.shape[0] == 7  # ⌈1000/7⌉ = 143
    out = emb(kjt(BAGS))[:, 0]
    for b, bag in enumerate(BAGS["movie"]):
        q = sum((Q[i // 7] for i in bag), torch.zeros(Q.shape[1]))
        r = sum((R[i % 7] for i in bag), torch.zeros(R.shape[1]))
        expected = {"mult": q * r, "add": q + r, "concat": torch.cat([q, r])}[op]
        torch.testing.assert_close(out[b], expected)


def test_qr_frequency_aware_gives_the_top_ids_their_own_q_rows():
    m = QuotientRemainder(F, 8, collisions=7, frequency_aware=True)
    emb = collection([F], [m])
    w = weights_by_name(emb)
    out = emb(kjt(BAGS))[:, 0]
    # Q[id % 143] ∘ R[id // 143]: ids 0…142 (the most frequent) share only R[0].
    torch.testing.assert_close(out[0], w["movie/qr_q"][3] * w["movie/qr_r"][0])
    torch.testing.assert_close(out[3], w["movie/qr_q"][0] * w["movie/qr_r"][0])
    assert m.r_rows == 7 and m.pair(torch.tensor([999]))[1].item() == 999 // 143 == 6


def test_qr_weights_scale_mult_once_and_add_linearly():
    for op in ("mult", "add"):
        emb = collection([F], [QuotientRemainder(F, 8, collisions=7, op=op, frequency_aware=False)])
        plain = emb(kjt({"movie": [[5]]}))
        weighted = emb(kjt({"movie": [[5]]}, weights={"movie": [[3.0]]}))
        torch.testing.assert_close(weighted, 3.0 * plain)


def test_qr_init_matches_a_full_table_scale():
    big = FeatureSpec("big", 200_000)
    for op in ("mult", "add", "concat"):
        emb = collection([big], [QuotientRemainder.solve(big, 16, 20, op=op)])
        out = emb(kjt({"big": [[i] for i in range(0, 200_000, 50)]})).detach()
        assert 0.007 < float(out.std()) < 0.013, op


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["mult", "concat"])
def test_qr_trains_every_table_in_a_collection(backend, op):
    feats = [FeatureSpec("a", 5000), FeatureSpec("b", 300, multi_hot=True)]
    emb = collection(feats, QuotientRemainder.solve_group(feats, 16, 10, op=op), backend)
    out, changed = train_step(emb, kjt({"a": [[1], [4999], [7], []], "b": [[1, 2, 3], [], [299], [5, 5]]}))
    assert out.shape == (4, 2, 16) and all(changed)


@needs_fbgemm
def test_qr_backends_agree():
    feats = [FeatureSpec("a", 5000), FeatureSpec("b", 300)]
    ids = kjt({"a": [[1], [4999], [], [0, 2]], "b": [[1, 2, 3], [], [299], [5]]})
    outs = [collection(feats, QuotientRemainder.solve_group(feats, 16, 10), b)(ids) for b in ("torch", "fbgemm")]
    torch.testing.assert_close(outs[0], outs[1])


@pytest.mark.parametrize("ratio", RATIOS)
def test_qr_budgets_and_reach(ratio):
    for rows in (10**5, 10**7, 123_457):
        f = FeatureSpec("f", rows)
        for op, reach in (("mult", math.sqrt(rows) / 2), ("concat", math.sqrt(rows))):
            if ratio > reach:  # out of reach alone: a clear error that says how far qr goes
                with pytest.raises(ConfigError, match="out of reach.*most it can reach"):
                    QuotientRemainder.solve(f, 16, ratio, op=op)
                continue
            m = QuotientRemainder.solve(f, 16, ratio, op=op)
            assert m.embedding_bytes() <= f.full_bytes(16) / ratio
            # c is an integer: at 2× concat has c = 1 (≈1×, too big) or c = 2 (4×).
            assert m.embedding_bytes() >= 0.45 * f.full_bytes(16) / ratio
    with pytest.raises(ConfigError, match="out of reach"):  # 3 rows: Q + R never beat 3 rows
        QuotientRemainder.solve(FeatureSpec("tiny", 3), 16, ratio)


def test_qr_group_lets_large_features_pay_for_small_ones():
    feats = [FeatureSpec("tiny", 3), FeatureSpec("small", 400), FeatureSpec("huge", 10**7)]
    ms = QuotientRemainder.solve_group(feats, 16, 100)
    budget = sum(f.full_bytes(16) for f in feats) / 100
    assert ms[0].q_rows + ms[0].r_rows == 4  # its smallest form
    assert 0.99 * budget <= sum(m.embedding_bytes() for m in ms) <= budget
    with pytest.raises(ConfigError, match="out of reach"):
        QuotientRemainder.solve_group(feats[:2], 16, 100)


def test_qr_through_the_builder_with_small_features_kept_full():
    feats = [FeatureSpec("weekday", 7), FeatureSpec("user", 50_000), FeatureSpec("movie", 9000)]
    cfg = {"dim": 16, "init_std": 0.01, "features": {}, "compression": {"method": "qr", "ratio": 40}}
    methods = build_methods(feats, cfg)
    assert [m.name for m in methods] == ["full", "qr", "qr"]
    assert sum(m.embedding_bytes() for m in methods) <= sum(f.full_bytes(16) for f in feats) / 40
    cfg["compression"]["ratio"] = 100  # movie (9000 rows) reaches ≈ 47×, user ≈ 112×: not together
    with pytest.raises(ConfigError, match="most it can reach"):
        build_methods(feats, cfg)


# --- binary_code ---------------------------------------------------------------------------------
def bits_of(i, positions):
    """The integer whose bit p is bit positions[p] of i."""
    return sum(((i >> j) & 1) << p for p, j in enumerate(positions))


def test_binary_code_succession_and_skip_by_hand():
    f = FeatureSpec("f", 1000)  # 10 bits; blocks of 4, 3, 3 bits; rows 16 + 8 + 8
    ids = torch.tensor([0, 1, 5, 77, 512, 999])
    succ = BinaryCode(f, 8, [4, 3, 3], layout="succession").block_values(ids)
    skip = BinaryCode(f, 8, [4, 3, 3], layout="skip").block_values(ids)
    for n, i in enumerate(ids.tolist()):
        assert succ[n].tolist() == [i & 15, (i >> 4) & 7, (i >> 7) & 7]
        assert skip[n].tolist() == [bits_of(i, [0, 3, 6, 9]), bits_of(i, [1, 4, 7]), bits_of(i, [2, 5, 8])]
    # Unequal blocks under skip: deal round-robin, then the wide block takes the rest.
    wide = BinaryCode(f, 8, [7, 3], layout="skip").block_values(ids)
    for n, i in enumerate(ids.tolist()):
        assert wide[n].tolist() == [bits_of(i, [0, 2, 4, 6, 7, 8, 9]), bits_of(i, [1, 3, 5])]


@pytest.mark.parametrize("layout", ["succession", "skip"])
@pytest.mark.parametrize("scramble", [False, True])
def test_binary_code_tuples_are_unique(layout, scramble):
    for rows, ratio in ((1000, 10), (5000, 100), (77, 2)):
        m = BinaryCode.solve(FeatureSpec("f", rows), 8, ratio, layout=layout, scramble=scramble)
        values = m.block_values(torch.arange(rows))
        assert all(int(values[:, i].max()) < 2 ** t for i, t in enumerate(m.block_bits))
        assert len({tuple(v) for v in values.tolist()}) == rows
    m = BinaryCode(FeatureSpec("f", 1024), 8, [5, 5], scramble=True)
    assert sorted(m.code(torch.arange(1024)).tolist()) == list(range(1024))  # a bijection of [0, 2^b)


@pytest.mark.parametrize("fusion", ["sum", "concat"])
def test_binary_code_vectors_by_hand(fusion):
    f = FeatureSpec("f", 1000)
    m = BinaryCode(f, 8, [4, 3, 3] if fusion == "sum" else [6, 4], fusion=fusion)
    emb = collection([f], [m])
    w = weights_by_name(emb)
    bags = [[3], [999, 3, 4], [], [0]]
    out = emb(kjt({"f": bags}, weights={"f": [[2.0], [1.0, 0.5, 1.0], [], [1.0]]}))[:, 0]
    weights = [[2.0], [1.0, 0.5, 1.0], [], [1.0]]
    for b, bag in enumerate(bags):
        expected = torch.zeros(8)
        for x, i in zip(weights[b], bag):
            if fusion == "sum":  # merged table: block 0 rows 0–15, block 1 rows 16–23, block 2 rows 24–31
                expected += x * (w["f/bc"][i & 15] + w["f/bc"][16 + ((i >> 4) & 7)] + w["f/bc"][24 + (i >> 7)])
            else:
                expected += x * torch.cat([w["f/bc0"][i & 63], w["f/bc1"][i >> 6]])
        torch.testing.assert_close(out[b], expected)


def test_binary_code_init_matches_a_full_table_scale():
    big = FeatureSpec("big", 200_000)
    for fusion in ("sum", "concat"):
        emb = collection([big], [BinaryCode.solve(big, 16, 100, fusion=fusion)])
        out = emb(kjt({"big": [[i] for i in range(0, 200_000, 50)]})).detach()
        assert 0.007 < float(out.std()) < 0.013, fusion


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fusion", ["sum", "concat"])
def test_binary_code_trains_every_table_in_a_collection(backend, fusion):
    feats = [FeatureSpec("a", 5000), FeatureSpec("b", 300, multi_hot=True)]
    emb = collection(feats, BinaryCode.solve_group(feats, 16, 100, fusion=fusion), backend)
    out, changed = train_step(emb, kjt({"a": [[1], [4999], [7], []], "b": [[1, 2, 3], [], [299], [5, 5]]}))
    assert out.shape == (4, 2, 16) and all(changed)


@needs_fbgemm
def test_binary_code_backends_agree():
    feats = [FeatureSpec("a", 5000), FeatureSpec("b", 300)]
    ids = kjt({"a": [[1], [4999], [], [0, 2]], "b": [[1, 2, 3], [], [299], [5]]})
    for fusion in ("sum", "concat"):
        outs = [collection(feats, BinaryCode.solve_group(feats, 16, 30, fusion=fusion), b)(ids)
                for b in ("torch", "fbgemm")]
        torch.testing.assert_close(outs[0], outs[1])


@pytest.mark.parametrize("ratio", RATIOS)
def test_binary_code_budgets(ratio):
    for rows in (10**5, 10**7, 123_457):
        f = FeatureSpec("f", rows)
        for fusion in ("sum", "concat"):
            m = BinaryCode.solve(f, 16, ratio, fusion=fusion)
            assert m.embedding_bytes() <= f.full_bytes(16) / ratio
            assert m.embedding_bytes() >= 0.3 * f.full_bytes(16) / ratio  # whole bits: within 2^k steps
    tiny = FeatureSpec("tiny", 3)  # 2 bits: at least two one-bit blocks = 4 rows > 3
    with pytest.raises(ConfigError, match="out of reach"):
        BinaryCode.solve(tiny, 16, ratio)
    ms = BinaryCode.solve_group([tiny, FeatureSpec("big", 10**6)], 16, ratio)
    assert sum(m.embedding_bytes() for m in ms) <= (10**6 + 3) * 64 / ratio


def test_binary_code_greedy_blocks_use_the_budget():
    # 100k ids, 17 bits. 10×: ≤ 10000 rows → [13, 4] = 8208 rows; 1000×: ≤ 100 rows.
    f = FeatureSpec("f", 100_000)
    assert BinaryCode.solve(f, 16, 10).block_bits == [13, 4]
    small = BinaryCode.solve(f, 16, 1000)
    assert sum(small.block_bits) == 17 and sum(2 ** t for t in small.block_bits) <= 100


def test_codes_embedding_bytes_equal_the_built_tensors():
    feats = [FeatureSpec("a", 5000), FeatureSpec("b", 300)]
    for methods in (QuotientRemainder.solve_group(feats, 16, 7, op="concat"),
                    BinaryCode.solve_group(feats, 16, 7, fusion="concat"), BinaryCode.solve_group(feats, 16, 7)):
        emb = collection(feats, methods)
        actual = sum(w.numel() * w.element_size() for w in emb.lookup.table_weights())
        actual += sum(t.numel() * t.element_size() for m in methods for t in m.state_dict().values())
        assert emb.embedding_bytes() == actual


@pytest.mark.skipif(not hasattr(QuotientRemainder, "from_export"), reason="no export contract yet")
def test_codes_rebuild_from_their_export():
    f = FeatureSpec("f", 5000)
    ids = kjt({"f": [[1, 4999], [5], []]})
    for m in (QuotientRemainder.solve(f, 8, 10, op="concat", frequency_aware=False),
              BinaryCode.solve(f, 8, 30, layout="skip", scramble=True, fusion="concat")):
        tensors, entry = m.export()
        again = type(m).from_export(entry, tensors)
        assert again.hyperparameters() == m.hyperparameters()
        a, b = m.remap(ids), again.remap(ids)
        assert a.keys() == b.keys() and torch.equal(a.values(), b.values())
