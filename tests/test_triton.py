"""The Triton lookup (run by the CPU interpreter) equals remap → torch lookup → combine.

Outputs, then several training steps: weights and row-wise Adagrad state of every table, with
duplicates, empty bags, multi-hot bags and per-sample weights. Tiny shapes: the interpreter is slow.
"""
import os
import subprocess
import sys

# The interpreter needs TRITON_INTERPRET=1 before triton is first imported (triton's own
# helpers such as tl.sum are made interpreted or compiled at import). Alone, this file sets
# it; in a session where triton is already loaded (torch/torchrec import it), the tests rerun
# in a fresh process.
if "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torchrec import KeyedJaggedTensor  # noqa: E402

pytest.importorskip("triton")
in_process = pytest.mark.skipif(not INTERPRETED, reason="runs in a fresh process (test_in_a_fresh_process)")


@pytest.mark.skipif(INTERPRETED, reason="already in interpreter mode")
def test_in_a_fresh_process():
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                            env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]

from embtables.kernels import RowwiseAdagrad  # noqa: E402
from embtables.kernels.lookup import seeded_initial_weights  # noqa: E402
from embtables.fused_embeddings import fused_parts  # noqa: E402
from embtables.kernels.triton.lookup import TritonFusedLookup, triton_available  # noqa: E402
from embtables.methods.binary_code import BinaryCode  # noqa: E402
from embtables.methods.full import Full  # noqa: E402
from embtables.methods.hashing import Hash  # noqa: E402
from embtables.methods.multiplexed import Multiplexed  # noqa: E402
from embtables.methods.qr import QuotientRemainder  # noqa: E402
from embtables.specs import FeatureSpec  # noqa: E402

DIM, BATCH = 8, 4


def methods_under_test():
    f = [FeatureSpec(f"f{i}", rows) for i, rows in enumerate([40, 1000, 77, 300, 513, 90, 60, 2000, 150, 700])]
    return [
        Full(f[0], DIM),
        Hash(f[1], DIM, rows=37),
        QuotientRemainder(f[2], DIM, collisions=9, op="mult"),
        QuotientRemainder(f[3], DIM, collisions=20, op="concat", frequency_aware=False),
        BinaryCode(f[4], DIM, block_bits=[6, 4], layout="skip", fusion="sum", scramble=True),
        BinaryCode(f[5], DIM, block_bits=[3, 2, 2], layout="succession", fusion="sum"),
        Multiplexed(f[6:8], DIM, rows=23, chunks=2, tables=2),
        QuotientRemainder(f[8], DIM, collisions=11, op="mult", frequency_aware=False, weight_both=True),
        Multiplexed(f[9:10], DIM, rows=29, chunks=4),  # another chunk count (per-feature chunks)
    ]


def raw_ids(methods, seed, weighted):
    """Raw-id KJT in method order: skewed ids (duplicates), 0..3 ids per bag (empty bags)."""
    g = torch.Generator().manual_seed(seed)
    features = [f for m in methods for f in m.features]
    lengths = torch.randint(0, 4, (len(features) * BATCH,), generator=g)
    values = torch.cat([(torch.rand(int(lengths[i * BATCH:(i + 1) * BATCH].sum()), generator=g).pow(2)
                         * f.rows).long().clamp_max(f.rows - 1) for i, f in enumerate(features)])
    weights = torch.rand(values.numel(), generator=g) + 0.5 if weighted else None
    return KeyedJaggedTensor(keys=[f.name for f in features], values=values, lengths=lengths, weights=weights)


def triton_lookup(methods, optimizer=None, seed=0):
    tables = [t for m in methods for t in m.physical_tables()]
    return TritonFusedLookup(fused_parts(methods, DIM), tables, DIM, optimizer, seed=seed)


class Reference:
    """remap → one F.embedding_bag per lookup key → combine; row-wise Adagrad on the rows used."""

    def __init__(self, methods, optimizer, seed):
        self.methods, self.optimizer = methods, optimizer
        tables = [t for m in methods for t in m.physical_tables()]
        self.weights = {t.name: w.clone().requires_grad_() for t, w in zip(tables, seeded_initial_weights(tables, seed))}
        self.states = {t.name: torch.zeros(t.rows) for t in tables}

    def forward(self, kjt):
        self.used = {name: [] for name in self.weights}
        outs, start = [], 0
        for m in self.methods:
            keys = kjt.keys()[start:start + len(m.features)]
            start += len(m.features)
            part = KeyedJaggedTensor.concat([_one(kjt, k) for k in keys])
            physical = m.remap(part)
            pooled = {}
            for key, table in m.lookups():
                jt = physical[key]
                self.used[table].append(jt.values())
                pooled[key] = F.embedding_bag(jt.values(), self.weights[table], jt.offsets()[:-1], mode="sum",
                                              per_sample_weights=jt.weights_or_none())
            outs.append(m.combine(pooled))
        return torch.cat(outs, dim=1)

    def step(self):
        with torch.no_grad():
            for name, w in self.weights.items():
                rows = torch.unique(torch.cat(self.used[name])) if self.used[name] else torch.zeros(0, dtype=torch.long)
                if w.grad is not None:
                    self.optimizer.apply_(w.data, self.states[name], rows, w.grad[rows])
                w.grad = None


def _one(kjt, key):
    jt = kjt[key]
    return KeyedJaggedTensor(keys=[key], values=jt.values(), lengths=jt.lengths(), weights=jt.weights_or_none())


@in_process
def test_interpreter_is_available():
    assert triton_available("cpu")


@in_process
@pytest.mark.parametrize("pick, kinds, mult", [(None, 0b11111, True), ([0], 0b1, False), ([1], 0b10, False),
                                               ([2], 0b1100, True), ([4], 0b10000, False), ([6], 0b10, False)],
                         ids=["all", "full", "hash", "qr-mult", "binary-code", "multiplexed"])
def test_matches_remap_lookup_combine_over_several_steps(pick, kinds, mult):
    """All methods in one plan, and plans of one method: the kernels compile out the row kinds and
    the part products a plan lacks (KINDS, HAS_MULT), so each such plan is its own program."""
    methods = methods_under_test()
    methods = methods if pick is None else [methods[i] for i in pick]
    opt = RowwiseAdagrad(lr=0.1)
    ref = Reference(methods, opt, seed=4)
    fast = triton_lookup(methods, opt, seed=4)
    assert (fast.plan.kinds, fast.plan.has_mult) == (kinds, mult)
    assert pick is not None or fast.plan.max_parts == 4
    for step in range(3):
        kjt = raw_ids(methods, seed=10 + step, weighted=step == 1)  # per-sample weights in step 1
        expected = ref.forward(kjt)
        out = fast(kjt)
        torch.testing.assert_close(out, expected.detach(), rtol=1e-5, atol=1e-6)
        target = torch.linspace(-1, 1, out.numel()).view_as(out)
        ((expected - target) ** 2).sum().backward()
        ref.step()
        ((out - target) ** 2).sum().backward()
    state = fast.lookup_state()
    for name, w in ref.weights.items():
        torch.testing.assert_close(state[f"{name}.weight"], w.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(state[f"{name}.momentum"], ref.states[name], rtol=1e-5, atol=1e-7)
    assert all(float(s.sum()) > 0 for s in ref.states.values())  # every table was trained


@in_process
def test_eval_and_state_round_trip():
    methods = methods_under_test()
    fast = triton_lookup(methods, seed=1).eval()
    kjt = raw_ids(methods, seed=3, weighted=False)
    before = fast.weight.clone()
    fast(kjt).sum().backward()  # eval: no update
    assert torch.equal(before, fast.weight)
    other = triton_lookup(methods, seed=2)
    other.load_lookup_state(fast.lookup_state())
    with torch.no_grad():
        torch.testing.assert_close(other(kjt), fast(kjt))


@in_process
def test_rejects_methods_without_fused_parts():
    from embtables.methods.low_rank import LowRank

    with pytest.raises(ValueError, match="'low_rank' has no fused"):
        triton_lookup([LowRank.solve(FeatureSpec("a", 500), DIM, 4.0)])


@in_process
def test_refuses_the_mean_combiner_clearly():
    mean = Multiplexed([FeatureSpec("a", 50)], DIM, rows=7, chunks=2, combiner="mean")
    with pytest.raises(ValueError, match="combiner 'mean'"):
        triton_lookup([mean])


@in_process
def test_collection_backend_triton_matches_the_torch_collection():
    from embtables.collection import build_embeddings

    # One method of each kind the torch collection serves (multiplexed's shared tables: tested above).
    methods = [m for i, m in enumerate(methods_under_test()) if i in (1, 2, 4)]
    features = [f for m in methods for f in m.features][::-1]  # feature order ≠ method order
    opt = RowwiseAdagrad(lr=0.1)
    ref = build_embeddings(features, DIM, methods, backend="torch", optimizer=opt, seed=6)
    fast = build_embeddings(features, DIM, methods, backend="triton", optimizer=opt, seed=6)
    assert fast.lookup.backends == ["triton"] * len(fast.tables)
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(0, 3, (len(features) * BATCH,), generator=g)
    values = torch.cat([torch.randint(0, f.rows, (int(lengths[i * BATCH:(i + 1) * BATCH].sum()),), generator=g)
                        for i, f in enumerate(features)])
    kjt = KeyedJaggedTensor(keys=[f.name for f in features], values=values, lengths=lengths)
    a, b = ref(kjt), fast(kjt)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    a.pow(2).sum().backward()
    b.pow(2).sum().backward()
    expected, got = ref.lookup.lookup_state(), fast.lookup.lookup_state()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)
