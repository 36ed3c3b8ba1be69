"""DLRM's pairwise dot interaction, with a hand-written backward.

dots[b, k] = <V[b, i_k], V[b, j_k]> for the pairs i_k < j_k (triu order). As bmm + advanced
indexing, autograd's backward is two bmms, a gradient accumulation and an `index_put` with
accumulate into a zeroed [B, n, n]; on CPU the scatter costs more than the products. Here the
forward is one bmm + `index_select`, and the backward dV = S V (S: the symmetric matrix of
pair gradients) is one multi-threaded pass of the compiled kernels (kernels/csrc/cpu_fused.cpp)
on CPU, or a scatter of each pair once + two bmms elsewhere.
"""
from __future__ import annotations

import torch

from embtables.kernels.cpu_fused import _library, threads_for


def pair_index(n: int, device=None) -> torch.Tensor:
    """Flat positions i·n + j of the pairs i < j in a row-major n×n matrix (triu order)."""
    rows, cols = torch.triu_indices(n, n, offset=1, device=device)
    return rows * n + cols


def _use_compiled(vectors: torch.Tensor, flat_pairs: torch.Tensor) -> bool:
    """The C kernels compute all pairs i < j: only for pair_index(n), on CPU, when built."""
    n = vectors.shape[1]
    return vectors.device.type == "cpu" and flat_pairs.numel() == n * (n - 1) // 2 and _library() is not None


class _PairwiseDots(torch.autograd.Function):
    @staticmethod
    def forward(ctx, vectors, flat_pairs):
        ctx.save_for_backward(vectors, flat_pairs)
        gram = torch.bmm(vectors, vectors.transpose(1, 2))
        return gram.flatten(1).index_select(1, flat_pairs)

    @staticmethod
    def backward(ctx, grad):
        vectors, flat_pairs = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None
        batch, n, dim = vectors.shape
        if _use_compiled(vectors, flat_pairs):
            v = vectors.float().contiguous()
            g = grad.float().contiguous()
            out = torch.empty(batch, n, dim)
            if _library().embtables_pairwise_dots_backward(batch, n, dim, v.data_ptr(), g.data_ptr(),
                                                           out.data_ptr(), threads_for(out.numel())) == 0:
                return out.to(vectors.dtype), None
        g = grad.new_zeros(batch, n * n)
        g.index_copy_(1, flat_pairs, grad.to(g.dtype))
        g = g.view(batch, n, n)
        # d<v_i, v_j> / dv_i = v_j and / dv_j = v_i: both directions, two bmms.
        v = vectors.to(g.dtype)
        return (torch.bmm(g, v) + torch.bmm(g.transpose(1, 2), v)).to(vectors.dtype), None


def pairwise_dots(vectors: torch.Tensor, flat_pairs: torch.Tensor) -> torch.Tensor:
    """[B, n, d] vectors → [B, n_pairs] dot products of the pairs i < j (`flat_pairs` = pair_index(n))."""
    return _PairwiseDots.apply(vectors, flat_pairs)
