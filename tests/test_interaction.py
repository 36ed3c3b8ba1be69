"""The pairwise-dot interaction kernel equals bmm + triu indexing: values and gradients."""
import pytest
import torch

from embtables.kernels import interaction
from embtables.kernels.cpu_fused import cpu_fused_available
from embtables.kernels.interaction import pair_index, pairwise_dots
from embtables.models.dlrm import DLRM

PATHS = ["compiled", "torch"] if cpu_fused_available() else ["torch"]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """Run each test on the compiled kernels and on the pure-torch path."""
    if request.param == "torch":
        monkeypatch.setattr(interaction, "_use_compiled", lambda *a: False)
    monkeypatch.setattr("embtables.kernels.cpu_fused.GRAIN", 1)  # tiny shapes: still threaded
    return request.param


def reference(vectors):
    n = vectors.shape[1]
    rows, cols = torch.triu_indices(n, n, offset=1)
    return torch.bmm(vectors, vectors.transpose(1, 2))[:, rows, cols]


def test_values_and_gradients_match_the_reference(path):
    g = torch.Generator().manual_seed(0)
    v = torch.randn(7, 5, 3, generator=g)
    weights = torch.randn(7, 10, generator=g)
    a, b = v.clone().requires_grad_(), v.clone().requires_grad_()
    out = pairwise_dots(a, pair_index(5))
    expected = reference(b)
    torch.testing.assert_close(out, expected)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(a.grad, b.grad)
    big = torch.randn(64, 27, 16, generator=g)  # DLRM's shape, threads split the batch
    torch.testing.assert_close(pairwise_dots(big, pair_index(27)), reference(big), rtol=1e-5, atol=1e-5)
    # By hand for one pair: d<v0, v1>/dv0 = v1.
    one = torch.zeros(7, 10)
    one[:, 0] = 1
    c = v.clone().requires_grad_()
    pairwise_dots(c, pair_index(5)).backward(one)
    torch.testing.assert_close(c.grad[:, 0], v[:, 1])
    assert torch.count_nonzero(c.grad[:, 2:]) == 0


def test_bf16_autocast_stays_close_and_grads_keep_the_input_dtype(path):
    v = torch.randn(16, 6, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pairwise_dots(v, pair_index(6))
    out.float().sum().backward()
    assert v.grad.dtype == torch.float32
    torch.testing.assert_close(out.float(), reference(v.detach()), rtol=0.05, atol=0.1)


def test_dlrm_uses_it_and_trains(path):
    torch.manual_seed(0)
    model = DLRM(3, 4, 8, [16], [16])
    dense, emb = torch.randn(32, 3), torch.randn(32, 4, 8, requires_grad=True)
    x = model.bottom(dense)
    vectors = torch.cat([x.unsqueeze(1), emb], 1)
    expected = model.top(torch.cat([x, reference(vectors)], 1)).squeeze(1)
    torch.testing.assert_close(model(dense, emb), expected)
    model(dense, emb).sum().backward()
    assert emb.grad is not None and all(p.grad is not None for p in model.parameters())
