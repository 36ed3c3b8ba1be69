"""Pooled outputs reuse memory only once torch has freed every view of them."""
import gc

import torch

from embtables.kernels.host_memory import ReusedOutputs, hugepage_empty


def test_memory_comes_back_only_after_the_last_view_is_freed():
    pool = ReusedOutputs(min_bytes=0)
    out = pool.empty(64, 8)
    address = out.data_ptr()
    view = out[3:]
    del out
    gc.collect()
    held = pool.empty(64, 8)  # `view` still holds the first block: this must be another one
    assert held.data_ptr() != address
    del view
    gc.collect()
    again = pool.empty(64, 8)
    assert again.data_ptr() == address
    again.fill_(1.0)
    assert held.data_ptr() != again.data_ptr()


def test_outputs_live_through_autograd_and_other_shapes_get_their_own_memory():
    pool = ReusedOutputs(min_bytes=0)
    w = torch.randn(8, requires_grad=True)
    out = pool.empty(16, 8)
    out.copy_(torch.ones(16, 8))
    loss = (out * w).sum()  # autograd saves `out` for the backward
    address = out.data_ptr()
    del out
    gc.collect()
    other = pool.empty(16, 8)
    other.fill_(5.0)  # must not write into the saved tensor
    loss.backward()
    assert torch.equal(w.grad, torch.full((8,), 16.0))
    assert pool.empty(8, 16).data_ptr() not in (address, other.data_ptr())


def test_at_most_keep_idle_blocks_are_held():
    pool = ReusedOutputs(keep=1, min_bytes=0)
    blocks = [pool.empty(4, 4) for _ in range(3)]
    del blocks
    gc.collect()
    assert len(pool._idle[(4, 4)]) == 1


def test_hugepage_tables_have_the_asked_shape_and_are_writable():
    t = hugepage_empty(300_000, 8)  # 9.6 MB: the huge-page path
    assert t.shape == (300_000, 8) and t.is_contiguous()
    t.fill_(2.0)
    assert float(t.sum()) == 2.0 * t.numel()
