"""Triton kernels: remap + gather + pool + combine in one pass, and the row-wise Adagrad backward.

Descriptors come from kernels/triton/plan.py. Forward: one program per (bag, feature); the
rows are derived from the raw ids inside the kernel, never written out. Backward: (1) the
gradient of each part's pooled vector, (2) one (row key, source, weight) entry per id and part,
(3) after a sort by row key, one program per unique row sums its entries in a fixed order and
applies row-wise Adagrad in place (deterministic, no atomics).

Set TRITON_INTERPRET=1 before importing this module to run it on CPU (tests do).
"""
from __future__ import annotations

import triton
import triton.language as tl

@triton.jit
def _mix64(z):  # the device copy of embtables.hashing's splitmix64 finaliser
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    return z ^ (z >> 31)


@triton.jit
def _derive_rows(x, kind, a, b, scr_on, scr_bits, scr_half, scr_mult, KINDS: tl.constexpr,
                 CODE_BITS: tl.constexpr):
    """Raw ids [L] → rows [L] of one part (kinds: 0 id, 1 hash, 2 div, 3 mod, 4 code bits).

    KINDS (bit k set: kind k occurs in the plan) compiles out the kinds a plan lacks: 64-bit
    division and the hash cost a GPU tens of instructions per id, and full tables need neither.
    """
    rows = x
    if KINDS & 2:
        # Salted hash exactly as embtables/hashing.py: mix64(id·φ + mix64(salt)), top bit dropped.
        h = _mix64(x.to(tl.uint64) * 0x9E3779B97F4A7C15 + a.to(tl.uint64))
        rows = tl.where(kind == 1, (h & 0x7FFFFFFFFFFFFFFF).to(tl.int64) % tl.maximum(b, 1), rows)
    if KINDS & 4:
        rows = tl.where(kind == 2, x // tl.maximum(a, 1), rows)
    if KINDS & 8:
        rows = tl.where(kind == 3, x % tl.maximum(a, 1), rows)
    if KINDS & 16:
        # binary_code: optional scramble of the b-bit code, then pext of this block's bits.
        mask = (1 << scr_bits) - 1
        y = x
        y = (y ^ (y >> scr_half)) & mask
        y = (y * scr_mult) & mask
        y = (y ^ (y >> scr_half)) & mask
        y = (y * scr_mult) & mask
        code = tl.where(scr_on != 0, y, x)
        value = tl.zeros_like(x)
        placed = a * 0
        for j in tl.static_range(CODE_BITS):
            take = (a >> j) & 1
            value = value | ((((code >> j) & 1) * take) << placed)
            placed = placed + take
        rows = tl.where(kind == 4, b + value, rows)
    return rows


@triton.jit
def _scramble(scr_p, hasscr_p, f):
    """Feature f's binary_code scramble: (on, bits, half, mult)."""
    return tl.load(hasscr_p + f), tl.load(scr_p + f * 3), tl.load(scr_p + f * 3 + 1), tl.load(scr_p + f * 3 + 2)


@triton.jit
def _part(kind_p, a_p, b_p, weighted_p, table_p, t_rows, fp):
    """Part descriptor fp = feature·P + part: (kind, a, b, weighted, table, table rows)."""
    t = tl.load(table_p + fp)
    kind, a, b, weighted = tl.load(kind_p + fp), tl.load(a_p + fp), tl.load(b_p + fp), tl.load(weighted_p + fp)
    return kind, a, b, weighted, t, tl.load(t_rows + t)


@triton.jit
def _chunk_rows(ids, psw, s, end_p, kind, a, b, weighted, rows, scr_on, scr_bits, scr_half, scr_mult,
                HAS_PSW: tl.constexpr, BLOCK_L: tl.constexpr, KINDS: tl.constexpr, CODE_BITS: tl.constexpr):
    """Positions s… of a bag (up to end_p): (positions, in-bag mask, derived rows, valid mask, weights)."""
    pos = s + tl.arange(0, BLOCK_L)
    pm = pos < end_p
    x = tl.load(ids + pos, mask=pm, other=0)
    r = _derive_rows(x, kind, a, b, scr_on, scr_bits, scr_half, scr_mult, KINDS, CODE_BITS)
    ok = pm & (r >= 0) & (r < rows)
    w = tl.full([BLOCK_L], 1.0, tl.float32)
    if HAS_PSW:
        w = tl.where(weighted != 0, tl.load(psw + pos, mask=pm, other=0.0), w)
    return pos, pm, r, ok, w


@triton.jit
def forward_kernel(ids, offsets, psw, weight, kind_p, a_p, b_p, col_p, weighted_p, table_p, nparts_p, op_p,
                   scr_p, hasscr_p, t_rows, t_dim, t_off, out, parts_out, B, F, OUT_D,
                   HAS_PSW: tl.constexpr, P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
                   KINDS: tl.constexpr, CODE_BITS: tl.constexpr, HAS_MULT: tl.constexpr):
    bag = tl.program_id(0)
    f = tl.program_id(1)
    start = tl.load(offsets + f * B + bag)
    end = tl.load(offsets + f * B + bag + 1)
    n = tl.load(nparts_p + f)
    op = tl.load(op_p + f)
    scr_on, scr_bits, scr_half, scr_mult = _scramble(scr_p, hasscr_p, f)
    cols = tl.arange(0, BLOCK_D)
    total = tl.zeros([BLOCK_D], tl.float32)
    prod = tl.full([BLOCK_D], 1.0, tl.float32)
    out_row = out + (bag * F + f) * OUT_D
    for p in tl.static_range(P):
        fp = f * P + p
        kind, a, b, weighted, t, rows = _part(kind_p, a_p, b_p, weighted_p, table_p, t_rows, fp)
        col = tl.load(col_p + fp)
        dim = tl.load(t_dim + t)
        base = tl.load(t_off + t)
        # Scalar conditions are folded into the bounds (parts past n_parts cover nothing).
        live = p < n
        end_p = tl.where(live, end, start)
        dim_p = tl.where(live, dim, 0)
        acc = tl.zeros([BLOCK_D], tl.float32)
        for s in range(start, end_p, BLOCK_L):
            pos, pm, r, ok, w = _chunk_rows(ids, psw, s, end_p, kind, a, b, weighted, rows, scr_on, scr_bits,
                                            scr_half, scr_mult, HAS_PSW, BLOCK_L, KINDS, CODE_BITS)
            tile = tl.load(weight + base + r[:, None] * dim + cols[None, :],
                           mask=ok[:, None] & (cols < dim_p)[None, :], other=0.0)
            acc += tl.sum(tile * w[:, None], axis=0)
        if HAS_MULT:  # kept for MULT's backward only
            tl.store(parts_out + ((bag * F + f) * P + p) * BLOCK_D + cols, acc)
        tl.store(out_row + col + cols, acc, mask=cols < tl.where(op == 0, dim_p, 0))
        total += acc
        prod = tl.where(live, prod * acc, prod)
    tl.store(out_row + cols, total, mask=cols < tl.where(op == 1, OUT_D, 0))
    tl.store(out_row + cols, prod, mask=cols < tl.where(op == 2, OUT_D, 0))


@triton.jit
def part_grad_kernel(grad, parts, col_p, table_p, nparts_p, op_p, t_dim, gparts, F, OUT_D,
                     P: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MULT: tl.constexpr):
    """d loss / d (pooled part p) for one (bag, feature): a column slice, the whole row, or × the others."""
    bag = tl.program_id(0)
    f = tl.program_id(1)
    n = tl.load(nparts_p + f)
    op = tl.load(op_p + f)
    cols = tl.arange(0, BLOCK_D)
    g_row = grad + (bag * F + f) * OUT_D
    whole = tl.load(g_row + cols, mask=cols < OUT_D, other=0.0)
    for p in tl.static_range(P):
        dim = tl.load(t_dim + tl.load(table_p + f * P + p))
        col = tl.load(col_p + f * P + p)
        dim_p = tl.where(p < n, dim, 0)
        sliced = tl.load(g_row + col + cols, mask=cols < tl.where(op == 0, dim_p, 0), other=0.0)
        others = tl.full([BLOCK_D], 1.0, tl.float32)
        if HAS_MULT:
            for q in tl.static_range(P):
                if q != p:
                    other = tl.load(parts + ((bag * F + f) * P + q) * BLOCK_D + cols)
                    others = tl.where(q < n, tl.where(op == 2, others * other, others), others)
        g = tl.where(op == 0, sliced, whole) * others
        tl.store(gparts + ((bag * F + f) * P + p) * BLOCK_D + cols, tl.where(cols < dim_p, g, 0.0))


@triton.jit
def expand_kernel(ids, offsets, psw, kind_p, a_p, b_p, weighted_p, table_p, nparts_p, scr_p, hasscr_p, t_rows,
                  keys, sources, factors, B, F,
                  HAS_PSW: tl.constexpr, P: tl.constexpr, BLOCK_L: tl.constexpr, KINDS: tl.constexpr,
                  CODE_BITS: tl.constexpr):
    """One entry per (id, part): row key, which part gradient it takes, and its bag weight."""
    bag = tl.program_id(0)
    f = tl.program_id(1)
    start = tl.load(offsets + f * B + bag)
    end = tl.load(offsets + f * B + bag + 1)
    n = tl.load(nparts_p + f)
    scr_on, scr_bits, scr_half, scr_mult = _scramble(scr_p, hasscr_p, f)
    for p in tl.static_range(P):
        kind, a, b, weighted, t, rows = _part(kind_p, a_p, b_p, weighted_p, table_p, t_rows, f * P + p)
        end_p = tl.where(p < n, end, start)
        for s in range(start, end_p, BLOCK_L):
            pos, pm, r, ok, w = _chunk_rows(ids, psw, s, end_p, kind, a, b, weighted, rows, scr_on, scr_bits,
                                            scr_half, scr_mult, HAS_PSW, BLOCK_L, KINDS, CODE_BITS)
            entry = pos * P + p
            tl.store(keys + entry, tl.where(ok, (t << 40) | r, -1), mask=pm)
            tl.store(sources + entry, (bag * F + f) * P + p + pos * 0, mask=pm)
            tl.store(factors + entry, w, mask=pm)


@triton.jit
def update_kernel(unique_keys, seg_starts, order, sources, factors, gparts, weight, state, t_dim, t_off, s_off,
                  lr, eps, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    """One unique row: sum its entries (sorted order), then row-wise Adagrad in place."""
    u = tl.program_id(0)
    key = tl.load(unique_keys + u)
    start = tl.load(seg_starts + u)
    end = tl.load(seg_starts + u + 1)
    t = key >> 40
    r = key & ((1 << 40) - 1)
    dim = tl.load(t_dim + t)
    cols = tl.arange(0, BLOCK_D)
    dmask = cols < dim
    acc = tl.zeros([BLOCK_D], tl.float32)
    for s in range(start, end, BLOCK_E):
        i = s + tl.arange(0, BLOCK_E)
        im = i < end
        e = tl.load(order + i, mask=im, other=0)
        src = tl.load(sources + e, mask=im, other=0)
        w = tl.load(factors + e, mask=im, other=0.0)
        tile = tl.load(gparts + src[:, None] * BLOCK_D + cols[None, :], mask=im[:, None] & dmask[None, :], other=0.0)
        acc += tl.sum(tile * w[:, None], axis=0)
    mean_sq = tl.sum(tl.where(dmask, acc * acc, 0.0), axis=0) / dim.to(tl.float32)
    s_idx = tl.load(s_off + t) + r
    new_state = tl.load(state + s_idx) + mean_sq
    tl.store(state + s_idx, new_state)
    step = lr / (tl.sqrt(new_state) + eps)
    w_ptr = weight + tl.load(t_off + t) + r * dim + cols
    tl.store(w_ptr, tl.load(w_ptr, mask=dmask, other=0.0) - step * acc, mask=dmask)
