"""Every lookup backend agrees with the pure-torch reference: outputs, gradients, weights, state."""
import pytest
import torch

from embtables.kernels import RowwiseAdagrad, make_lookup
from embtables.specs import TableSpec

from embtables.kernels import cpu_fused_available, fbgemm_available
from helpers import needs_fbgemm


def random_bags(tables, batch, max_len, seed, empty_share=0.2):
    """TBE-layout inputs with duplicates, multi-hot bags and empty bags."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_len + 1, (len(tables) * batch,), generator=g)
    lengths[torch.rand(lengths.shape, generator=g) < empty_share] = 0
    parts = []
    for i, t in enumerate(tables):
        n = int(lengths[i * batch:(i + 1) * batch].sum())
        # Skewed ids so the same rows repeat inside and across bags.
        parts.append((torch.rand(n, generator=g).pow(3) * t.rows).long().clamp_max(t.rows - 1))
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.long)
    torch.cumsum(lengths, 0, out=offsets[1:])
    return torch.cat(parts), offsets


TABLES = [TableSpec("a", 50, 8), TableSpec("b", 7, 4), TableSpec("c", 300, 16), TableSpec("d", 20, 3)]


def train_steps(lookup, tables, steps, weighted):
    outs = []
    for step in range(steps):
        indices, offsets = random_bags(tables, batch=16, max_len=4, seed=step)
        psw = torch.rand(indices.numel(), generator=torch.Generator().manual_seed(99 + step)) if weighted else None
        out = lookup(indices, offsets, psw)
        target = torch.linspace(-1, 1, out.shape[1])
        ((out - target) ** 2).sum().backward()
        outs.append(out.detach())
    return outs


@needs_fbgemm
@pytest.mark.parametrize("weighted", [False, True])
def test_fbgemm_matches_torch_reference_over_several_steps(weighted):
    opt = RowwiseAdagrad(lr=0.1)
    ref = make_lookup(TABLES, backend="torch", optimizer=opt, seed=3)
    fused = make_lookup(TABLES, backend="fbgemm", optimizer=opt, seed=3)
    assert fused.backends == ["fbgemm", "fbgemm", "fbgemm", "torch"]  # dim 3 falls back
    for a, b in zip(train_steps(ref, TABLES, 4, weighted), train_steps(fused, TABLES, 4, weighted)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(ref.table_weights(), fused.table_weights()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(ref.optimizer_states(), fused.optimizer_states()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert any(float(s.abs().sum()) > 0 for s in ref.optimizer_states())


def test_reference_update_is_rowwise_adagrad_with_duplicates_merged():
    table = TableSpec("t", 5, 4)
    lookup = make_lookup([table], backend="torch", optimizer=RowwiseAdagrad(lr=0.5, eps=1e-8), seed=0)
    w0 = lookup.table_weights()[0].clone()
    indices = torch.tensor([1, 1, 3])         # row 1 twice in one bag, row 3 in the next
    offsets = torch.tensor([0, 2, 3])
    out = lookup(indices, offsets)
    torch.testing.assert_close(out, torch.stack([2 * w0[1], w0[3]]))
    out.sum().backward()                      # d/dw[1] = 2 (two occurrences), d/dw[3] = 1
    w1 = lookup.table_weights()[0]
    for row, g in ((1, 2.0), (3, 1.0)):
        state = g * g                          # mean over dims of g²
        torch.testing.assert_close(w1[row], w0[row] - 0.5 * g / (state ** 0.5 + 1e-8))
        assert float(lookup.optimizer_states()[0][row]) == pytest.approx(state)
    torch.testing.assert_close(w1[[0, 2, 4]], w0[[0, 2, 4]])  # untouched rows stay put


def test_eval_forward_does_not_update():
    lookup = make_lookup(TABLES, backend="torch", seed=1).eval()
    before = [w.clone() for w in lookup.table_weights()]
    indices, offsets = random_bags(TABLES, 8, 3, seed=5)
    with torch.no_grad():
        lookup(indices, offsets)
    for a, b in zip(before, lookup.table_weights()):
        assert torch.equal(a, b)


@needs_fbgemm
def test_lookup_state_round_trips_across_backends():
    src = make_lookup(TABLES, backend="fbgemm", seed=7)
    train_steps(src, TABLES, 2, weighted=False)
    dst = make_lookup(TABLES, backend="torch", seed=8)
    dst.load_lookup_state(src.lookup_state())
    indices, offsets = random_bags(TABLES, 8, 3, seed=11)
    with torch.no_grad():
        torch.testing.assert_close(src(indices, offsets), dst(indices, offsets), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "cpu_fused", "fbgemm"])
@pytest.mark.parametrize("bad_id", [7, 70, -1])
def test_out_of_range_ids_raise_on_every_backend(backend, bad_id):
    """An id ≥ rows (or negative) of the table it reads is an error, never a silent row 0."""
    if backend == "fbgemm" and not fbgemm_available():
        pytest.skip("fbgemm_gpu does not import")
    if backend == "cpu_fused" and not cpu_fused_available():
        pytest.skip("cpu_fused kernels are not built")
    tables = [TableSpec("a", 50, 8), TableSpec("b", 7, 4)]
    lookup = make_lookup(tables, backend=backend, seed=0)
    assert lookup.backends == [backend, backend]
    # Bags: a=[3], a=[49, 1], b=[6], b=[2, bad]: the bad id sits in table b (7 rows), valid for a.
    indices = torch.tensor([3, 49, 1, 6, 2, bad_id])
    offsets = torch.tensor([0, 1, 3, 4, 6])
    with pytest.raises((IndexError, RuntimeError), match=r"range \[0, 7\)"):
        lookup(indices, offsets)
    lookup(indices[:-1], offsets.clamp_max(5))  # the same bags without the bad id are fine
