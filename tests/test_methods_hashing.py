"""salted hash, hash (the hashing trick) and multiplexed (one shared table): formulas by hand,
both lookup backends, gradients, multi-hot and empty bags, budgets."""
import math

import pytest
import torch

from embtables.collection import build_embeddings
from embtables.errors import ConfigError
from embtables.kernels import RowwiseAdagrad
from embtables.methods.full import Full
from embtables.methods.hashing import Hash
from embtables.methods.multiplexed import Multiplexed
from embtables.hashing import salt_of, salted_hash
from embtables.specs import FeatureSpec

from helpers import kjt, needs_cpu_fused, needs_fbgemm

BACKENDS = ["torch", pytest.param("fbgemm", marks=needs_fbgemm), pytest.param("cpu_fused", marks=needs_cpu_fused)]
M64 = (1 << 64) - 1


def splitmix_reference(x: int, salt: int) -> int:
    """The documented hash written out with Python's unbounded ints."""
    def fmix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        return z ^ (z >> 31)
    return fmix((x * 0x9E3779B97F4A7C15 + fmix(salt)) & M64) & ((1 << 63) - 1)


def collection(features, methods, backend, lr=0.1):
    return build_embeddings(features, 8 if not methods else methods[0].dim, methods, backend=backend,
                               optimizer=RowwiseAdagrad(lr=lr), seed=1)


# --- the salted hash ------------------------------------------------------------------------
def test_salted_hash_equals_the_reference_including_wrapping_ids():
    ids = [0, 1, 2, 7, 12345, 2**31 - 1, 2**40 + 3, 2**62, 2**63 - 1]
    for salt in (0, 1, salt_of("user"), (1 << 63) - 1):
        got = salted_hash(torch.tensor(ids), salt).tolist()
        assert got == [splitmix_reference(x, salt) for x in ids]
        assert min(got) >= 0


def test_salted_hash_takes_one_salt_per_id():
    ids = torch.tensor([5, 5, 9, 9])
    salts = torch.tensor([3, 4, 3, 4])
    assert salted_hash(ids, salts).tolist() == [splitmix_reference(5, 3), splitmix_reference(5, 4),
                                               splitmix_reference(9, 3), splitmix_reference(9, 4)]


def test_salted_hash_is_roughly_uniform_and_salts_are_unrelated():
    ids = torch.arange(200_000)
    m = 100
    for salt in (salt_of("a"), salt_of("b")):
        counts = torch.bincount(salted_hash(ids, salt) % m, minlength=m).double()
        chi2 = float(((counts - 2000) ** 2 / 2000).sum())
        assert chi2 < 99 + 6 * math.sqrt(2 * 99)  # χ²(99): mean 99, sd 14
    a, b = salted_hash(ids, salt_of("a")) % m, salted_hash(ids, salt_of("b")) % m
    assert abs(float((a == b).double().mean()) - 1 / m) < 0.002  # agreement only by chance
    assert salt_of("a") == salt_of("a") != salt_of("a", 0) != salt_of("a", 1)


# --- hash ------------------------------------------------------------------------------------
def test_hash_rows_and_vectors_by_hand():
    f = FeatureSpec("city", 1000)
    method = Hash.solve(f, 8, ratio=10)
    assert method.rows == 100 and method.embedding_bytes() == 100 * 8 * 4
    emb = collection([f], [method], "torch")
    bags = [[3], [999, 3, 4], [], [0]]
    w = emb.lookup.table_weights()[0]
    row = lambda i: splitmix_reference(i, salt_of("city")) % 100  # noqa: E731
    expected = torch.stack([sum((w[row(i)] for i in bag), torch.zeros(8)) for bag in bags])
    torch.testing.assert_close(emb(kjt({"city": bags}))[:, 0], expected)


def test_hash_passes_per_sample_weights():
    f = FeatureSpec("city", 1000)
    emb = collection([f], [Hash.solve(f, 8, ratio=10)], "torch")
    w = emb.lookup.table_weights()[0]
    row = lambda i: splitmix_reference(i, salt_of("city")) % 100  # noqa: E731
    out = emb(kjt({"city": [[1, 2], []]}, weights={"city": [[0.5, 2.0], []]}))
    torch.testing.assert_close(out[0, 0], 0.5 * w[row(1)] + 2.0 * w[row(2)])
    assert float(out[1].detach().abs().sum()) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_hash_in_a_dlrm_like_collection_trains(backend):
    feats = [FeatureSpec("a", 5000), FeatureSpec("b", 300, multi_hot=True)]
    emb = collection(feats, Hash.solve_group(feats, 16, ratio=10), backend)
    before = [w.clone() for w in emb.lookup.table_weights()]
    ids = kjt({"a": [[1], [4999], [7], [0]], "b": [[1, 2, 3], [], [299], [5, 5]]})
    out = emb(ids)
    assert out.shape == (4, 2, 16)
    (out * torch.randn_like(out)).sum().backward()
    assert all(not torch.equal(a, b) for a, b in zip(before, emb.lookup.table_weights()))


@needs_fbgemm
def test_hash_backends_agree():
    feats = [FeatureSpec("a", 5000), FeatureSpec("b", 300)]
    ids = kjt({"a": [[1], [4999], [], [0, 2]], "b": [[1, 2, 3], [], [299], [5]]})
    outs = [collection(feats, Hash.solve_group(feats, 16, ratio=10), b)(ids) for b in ("torch", "fbgemm")]
    torch.testing.assert_close(outs[0], outs[1])


@pytest.mark.parametrize("ratio", [2, 10, 100, 1000])
def test_hash_budgets(ratio):
    for rows in (10**5, 10**7, 123_457):
        f = FeatureSpec("f", rows)
        m = Hash.solve(f, 16, ratio)
        assert m.embedding_bytes() <= f.full_bytes(16) / ratio
        assert m.embedding_bytes() >= 0.99 * f.full_bytes(16) / ratio - 64  # uses the budget
    f = FeatureSpec("tiny", 3)
    if ratio <= 3:  # one row fits
        assert Hash.solve(f, 16, ratio).rows == 1
    else:
        with pytest.raises(ConfigError, match="out of reach"):
            Hash.solve(f, 16, ratio)


def test_hash_group_pays_for_a_tiny_feature_from_the_large_ones():
    feats = [FeatureSpec("tiny", 3), FeatureSpec("big", 100_000)]
    ms = Hash.solve_group(feats, 16, ratio=100)
    budget = sum(f.full_bytes(16) for f in feats) / 100
    assert ms[0].rows == 1 and sum(m.embedding_bytes() for m in ms) <= budget
    assert ms[1].rows == math.floor(budget / 64) - 1  # the rest of the budget


def test_hash_embedding_bytes_equal_the_built_tensors():
    feats = [FeatureSpec("a", 5000), FeatureSpec("b", 300)]
    methods = Hash.solve_group(feats, 16, ratio=7)
    emb = collection(feats, methods, "torch")
    actual = sum(w.numel() * w.element_size() for w in emb.lookup.table_weights())
    actual += sum(t.numel() * t.element_size() for m in methods for t in m.state_dict().values())
    assert emb.embedding_bytes() == actual


# --- multiplexed ------------------------------------------------------------------------------
FEATS = [FeatureSpec("user", 2000), FeatureSpec("item", 1000), FeatureSpec("tags", 50, multi_hot=True)]


def test_multiplexed_one_table_sized_by_the_group_budget():
    (m,) = Multiplexed.solve_group(FEATS, 16, ratio=10, chunks=2)
    assert [(t.rows, t.dim) for t in m.physical_tables()] == [(3050 * 2 // 10, 8)]
    assert m.embedding_bytes() == 610 * 8 * 4 <= m.full_bytes() / 10
    (s,) = Multiplexed.solve_group(FEATS, 16, ratio=10, chunks=4, tables=2)
    assert [(t.rows, t.dim) for t in s.physical_tables()] == [(610, 4), (610, 4)]
    # Slots dealt round-robin in feature-major order: user/0 → 0, user/1 → 1, user/2 → 0, …
    assert dict(s.lookups())["user/mux1"].endswith("multiplexed1")
    assert dict(s.lookups())["item/mux0"].endswith("multiplexed0")


def test_multiplexed_chunks_and_features_hash_to_different_rows():
    (m,) = Multiplexed.solve_group(FEATS, 16, ratio=1, chunks=4)  # m = 12200 rows
    ids = torch.arange(1000)
    rows = {(f, j): salted_hash(ids, salt_of(f, j)) % m.rows for f in ("user", "item") for j in range(4)}
    out = m.remap(kjt({"user": [[i] for i in range(1000)], "item": [[i] for i in range(1000)],
                       "tags": [[] for _ in range(1000)]}))
    for f in ("user", "item"):
        for j in range(4):
            assert torch.equal(out[f"{f}/mux{j}"].values(), rows[(f, j)])
    for j in range(4):  # chunks of one id: equal only by chance (1/m each)
        for k in range(j):
            assert float((rows[("user", j)] == rows[("user", k)]).double().mean()) < 0.01
        assert float((rows[("user", j)] == rows[("item", j)]).double().mean()) < 0.01
    # The concatenated chunk rows identify each id even where single chunks collide.
    tuples = torch.stack([rows[("user", j)] for j in range(4)], 1)
    assert len({tuple(t) for t in tuples.tolist()}) == 1000


@pytest.mark.parametrize("backend", BACKENDS)
def test_multiplexed_vectors_by_hand_multi_hot_and_weights(backend):
    (m,) = Multiplexed.solve_group(FEATS, 16, ratio=10, chunks=2)
    emb = collection(FEATS, [m], backend)
    (w,) = emb.lookup.table_weights()
    bags = {"user": [[1], [2], [], [1999]], "item": [[1], [], [999], [3]], "tags": [[0, 7], [], [49], [7, 7, 1]]}
    weights = {k: [[0.5 + i for i in range(len(b))] for b in v] for k, v in bags.items()}
    out = emb(kjt(bags, weights))
    assert out.shape == (4, 3, 16)
    for fi, f in enumerate(FEATS):
        for b, bag in enumerate(bags[f.name]):
            expected = torch.zeros(16)
            for wt, i in zip(weights[f.name][b], bag):
                expected += wt * torch.cat([w[splitmix_reference(i, salt_of(f.name, j)) % m.rows] for j in range(2)])
            torch.testing.assert_close(out[b, fi], expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_multiplexed_trains_the_shared_table(backend):
    (m,) = Multiplexed.solve_group(FEATS, 16, ratio=10, chunks=2, tables=2)
    emb = collection(FEATS, [m], backend)
    before = [w.clone() for w in emb.lookup.table_weights()]
    out = emb(kjt({"user": [[1], [5]], "item": [[2], [3]], "tags": [[1, 2], []]}))
    (out * torch.randn_like(out)).sum().backward()
    assert all(not torch.equal(a, b) for a, b in zip(before, emb.lookup.table_weights()))


@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_multiplexed_backends_agree_next_to_other_methods_over_training_steps(backend):
    feats = FEATS + [FeatureSpec("city", 500)]
    ids = kjt({"user": [[1], [2], []], "item": [[4], [], [999]], "tags": [[0, 7], [], [49]], "city": [[3], [4], [5]]})
    outs, weights = [], []
    for name in ("torch", backend):
        methods = Multiplexed.solve_group(FEATS, 16, ratio=10, tables=2) + [Hash.solve(feats[-1], 16, 10)]
        emb = collection(feats, methods, name)
        for step in range(3):  # the slots' gradients into one shared table merge the same way
            out = emb(ids)
            (out * torch.linspace(-1, 1, 16)).sum().backward()
        outs.append(out.detach())
        weights.append(emb.lookup.table_weights())
    assert outs[0].shape == (3, 4, 16)
    torch.testing.assert_close(outs[0], outs[1])
    for a, b in zip(*weights):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ratio", [2, 10, 100, 1000])
def test_multiplexed_budgets(ratio):
    feats = [FeatureSpec("huge", 10**7), FeatureSpec("mid", 123_457), FeatureSpec("tiny", 3)]
    (m,) = Multiplexed.solve_group(feats, 16, ratio)
    budget = m.full_bytes() / ratio
    assert budget - 8 * 4 < m.embedding_bytes() <= budget
    with pytest.raises(ConfigError, match="out of reach"):
        Multiplexed.solve(FeatureSpec("tiny", 3), 16, ratio=100)
    with pytest.raises(ConfigError, match="divide"):
        Multiplexed.solve_group(feats, 16, ratio, chunks=3)


def test_multiplexed_embedding_bytes_count_only_the_table():
    (m,) = Multiplexed.solve_group(FEATS, 16, ratio=10)
    assert m.state_dict() == {}  # salts derive from names: nothing else to store
    assert m.embedding_bytes() == sum(t.rows * t.dim * 4 for t in m.physical_tables())


def zipf_feature(name, rows, mean_length=1.0):
    counts = (100_000 / torch.arange(1, rows + 1).double()).long().numpy() + 1
    return FeatureSpec(name, rows, multi_hot=mean_length > 1, mean_length=mean_length, counts=counts)


def test_hash_and_multiplexed_rebuild_from_their_export():
    feats = [zipf_feature("a", 1000), zipf_feature("b", 300)]
    ids = kjt({"a": [[1, 999], [5]], "b": [[0], [299]]})
    for m in [Hash.solve(feats[0], 8, 10)] + Multiplexed.solve_group(feats, 8, 10, chunks=4, tables=3):
        tensors, entry = m.export()
        again = type(m).from_export(entry, tensors)
        assert again.hyperparameters() == m.hyperparameters()
        part = ids if isinstance(m, Multiplexed) else ids.split([1, 1])[0]
        a, b = m.remap(part), again.remap(part)
        assert a.keys() == b.keys() and torch.equal(a.values(), b.values())


def test_multiplexed_default_chunks_divide_the_dim():
    for dim, chunks in ((16, 4), (6, 2), (5, 1)):
        (m,) = Multiplexed.solve_group(FEATS, dim, ratio=10)
        assert (m.chunks, m.chunk_dim) == (chunks, dim // chunks)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_gather_combine_equals_each_methods_combine(backend):
    """Full, hash and multiplexed only place columns, so the collection combines them in one
    gather; outputs and the tables after a step equal the method-by-method path."""
    feats = FEATS + [FeatureSpec("city", 500), FeatureSpec("zip", 40)]
    ids = kjt({"user": [[1], [2], []], "item": [[4], [], [999]], "tags": [[0, 7], [], [49]],
               "city": [[3], [4, 4], [5]], "zip": [[1], [2], [39]]})
    results = []
    for fast in (True, False):
        methods = [Full(feats[4], 16), Multiplexed.solve_group(FEATS, 16, ratio=10)[0], Hash.solve(feats[3], 16, 10)]
        emb = collection(feats, methods, backend)
        assert emb._gather is not None  # every method here only places columns
        if not fast:
            emb._gather = None  # the general path: split, each method's combine, cat, reorder
        out = emb(ids)
        (out * torch.linspace(-1, 1, 16)).sum().backward()
        results.append((out.detach(), [w.clone() for w in emb.lookup.table_weights()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)
