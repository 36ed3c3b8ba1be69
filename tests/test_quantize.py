"""Row-wise int8/int4 and binary quantizers, byte counts, and the serving lookup's two paths."""
import pytest
import torch
import torch.nn.functional as F

from embtables.serving.quantize import (binarize, debinarize, dequantize_table, expected_bytes, pack_codes,
                                quantize_table, stored_bytes, unpack_codes)
from embtables.serving.lookup import ServingLookup, fbgemm_nbit_available


def table(rows=50, dim=12, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, dim, generator=g) * scale
    w[:, 0] += torch.linspace(-0.2, 0.3, rows)  # rows that are not centred
    return w


@pytest.mark.parametrize("bits", [1, 4, 8])
@pytest.mark.parametrize("dim", [1, 7, 16])
def test_pack_round_trip_and_layout(bits, dim):
    codes = torch.randint(0, 1 << bits, (5, dim), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (5, -(-dim * bits // 8)) and packed.dtype == torch.uint8
    assert torch.equal(unpack_codes(packed, bits, dim), codes)
    if bits == 4 and dim >= 2:  # FBGEMM's layout: element 0 in the low nibble of byte 0
        assert torch.equal(packed[:, 0], codes[:, 0] | (codes[:, 1] << 4))


def test_int8_is_symmetric_with_half_step_error():
    w = table(dim=16)
    q = quantize_table(w, "int8")
    assert set(q) == {"codes", "scale"} and q["scale"].dtype == torch.float16
    scale = q["scale"].float()
    assert torch.allclose(scale, w.abs().max(1).values / 127, rtol=1e-3)
    err = (dequantize_table(q, "int8", 16) - w).abs().max(1).values
    assert (err <= scale / 2 * 1.01 + 1e-7).all()
    # x̂ = (code − 128)·scale, written out independently of the library.
    manual = (q["codes"].float() - 128) * scale[:, None]
    assert torch.allclose(dequantize_table(q, "int8", 16), manual)


def test_int4_is_asymmetric_min_max():
    w = table(dim=17)
    q = quantize_table(w, "int4")
    assert set(q) == {"codes", "scale", "bias"} and q["codes"].shape == (50, 9)
    lo, hi = w.min(1).values, w.max(1).values
    assert torch.allclose(q["bias"].float(), lo, atol=1e-3)
    assert torch.allclose(q["scale"].float(), (hi - lo) / 15, rtol=2e-3)
    err = (dequantize_table(q, "int4", 17) - w).abs().max(1).values
    assert (err <= q["scale"].float() / 2 * 1.01 + 1e-3 * lo.abs()).all()
    assert (dequantize_table(q, "int4", 17) - w).abs().max() > 1e-3  # really 4 bits


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_narrow_tables_share_a_scale_among_rows(precision):
    w = table(rows=50, dim=3)  # ⌈16/3⌉ = 6 rows a scale: 9 scales for 50 rows
    q = quantize_table(w, precision)
    assert q["scale"].shape == (9,)
    groups = torch.cat([w, w[-1:].expand(4, 3)]).reshape(9, 18)  # 6 rows × 3 values each
    if precision == "int8":
        assert torch.allclose(q["scale"].float(), groups.abs().max(1).values / 127, rtol=1e-3)
    else:
        assert torch.allclose(q["bias"].float(), groups.min(1).values, atol=1e-3)
    step = q["scale"].float().repeat_interleave(6)[:50, None]
    assert ((dequantize_table(q, precision, 3) - w).abs() <= step / 2 * 1.01 + 1e-3 * w.abs()).all()
    assert stored_bytes(q) <= (0.3 if precision == "int8" else 0.5) * 50 * 3 * 4


def test_constant_rows_and_gathered_rows():
    w = torch.full((4, 6), 0.25)
    w[1] = 0.0
    for p in ("int8", "int4"):
        q = quantize_table(w, p)
        assert torch.allclose(dequantize_table(q, p, 6), w, atol=1e-3)
    q = quantize_table(table(), "int4")
    rows = torch.tensor([3, 0, 3, 49])
    assert torch.equal(dequantize_table(q, "int4", 12, rows), dequantize_table(q, "int4", 12)[rows])


def test_large_values_keep_fp32_scales():
    w = table() * 1e6
    q = quantize_table(w, "int8")
    assert q["scale"].dtype == torch.float32
    assert torch.allclose(dequantize_table(q, "int8", 12), w, rtol=0, atol=w.abs().max().item() / 200)


def test_binary_sign_and_mean_abs_scale():
    w = table(dim=20)
    q = binarize(w, 1)
    assert q["signs"].shape == (50, 1, 3) and q["scale"].shape == (50, 1)
    expected = torch.where(w >= 0, 1.0, -1.0) * w.abs().mean(1, keepdim=True)
    assert torch.allclose(debinarize(q, 20), expected, atol=1e-3 * expected.abs().max())


def test_binary_narrow_tables_share_alpha():
    w = table(rows=10, dim=4)  # ⌈16/4⌉ = 4 rows an α: groups of rows 0-3, 4-7, 8-9
    q = quantize_table(w, "binary")
    assert q["scale"].shape == (3, 1)
    alphas = torch.stack([w[a:b].abs().mean() for a, b in ((0, 4), (4, 8), (8, 10))])
    assert torch.allclose(q["scale"].float().squeeze(1), alphas, rtol=1e-3)
    expected = torch.where(w >= 0, 1.0, -1.0) * alphas.repeat_interleave(4)[:10, None]
    assert torch.allclose(dequantize_table(q, "binary", 4), expected, rtol=1e-3)


def test_binary_residual_levels_reduce_error():
    w = table(dim=16)
    errors = [((debinarize(binarize(w, u), 16) - w) ** 2).mean().item() for u in (1, 2, 3, 4)]
    assert all(a > b for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 0.3 * errors[0]


@pytest.mark.parametrize("precision,bits", [("none", 1), ("int8", 1), ("int4", 1), ("binary", 1), ("binary", 3)])
@pytest.mark.parametrize("dim", [5, 16])
def test_stored_bytes_match_expected(precision, bits, dim):
    q = quantize_table(table(rows=30, dim=dim), precision, bits)
    assert stored_bytes(q) == expected_bytes(30, dim, precision, bits)


def test_int8_is_under_30_percent_of_fp32_at_dim_16():
    assert expected_bytes(1000, 16, "int8") <= 0.3 * expected_bytes(1000, 16, "none")


def bags(keys, batch, rows, seed=0, weighted=False):
    """Random multi-hot bags (some empty) for `keys` keys: values, offsets, weights."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (keys * batch,), generator=g)
    lengths[::5] = 0
    values = torch.cat([torch.randint(0, rows[k], (int(lengths[k * batch:(k + 1) * batch].sum()),), generator=g)
                        for k in range(keys)])
    offsets = torch.zeros(keys * batch + 1, dtype=torch.long)
    offsets[1:] = lengths.cumsum(0)
    w = torch.rand(values.numel(), generator=g) if weighted else None
    return values, offsets, w


def reference(weights, lookups, values, offsets, w, batch):
    """Pooled sums, bag by bag, from dequantized tables (independent of the lookup's slicing)."""
    out = []
    for k, t in enumerate(lookups):
        lo, hi = int(offsets[k * batch]), int(offsets[(k + 1) * batch])
        bag = offsets[k * batch:(k + 1) * batch + 1] - lo
        out.append(F.embedding_bag(values[lo:hi], weights[t], bag, mode="sum", include_last_offset=True,
                                   per_sample_weights=None if w is None else w[lo:hi]))
    return torch.cat(out, 1)


@pytest.mark.parametrize("precision", ["none", "int8", "int4", "binary"])
@pytest.mark.parametrize("weighted", [False, True])
def test_serving_lookup_matches_reference(precision, weighted):
    specs = [("a", 40, 8), ("b", 25, 5), ("c", 60, 16)]  # b: odd dim (int4 → torch even with FBGEMM)
    tables = [{"name": n, "rows": r, "dim": d, "precision": precision} for n, r, d in specs]
    stored = [quantize_table(table(r, d, seed=i), precision, 2) for i, (_, r, d) in enumerate(specs)]
    dense = [dequantize_table(s, precision, d) for s, (_, _, d) in zip(stored, specs)]
    lookups = [["a", "a"], ["b", "b"], ["c", "c"], ["a2", "a"]]  # two keys read table a
    batch = 9
    values, offsets, w = bags(4, batch, [40, 25, 60, 40], weighted=weighted)
    expected = reference(dense, [0, 1, 2, 0], values, offsets, w, batch)
    for backend in ("torch", "auto"):
        lookup = ServingLookup(tables, stored, lookups, backend=backend)
        out = lookup(values, offsets, w)
        assert out.shape == (batch, 8 + 5 + 16 + 8)
        assert torch.allclose(out, expected, atol=1e-5), backend


@pytest.mark.skipif(not fbgemm_nbit_available(), reason="fbgemm_gpu does not import")
@pytest.mark.parametrize("precision", ["none", "int8", "int4"])
def test_fbgemm_and_torch_paths_agree(precision):
    specs = [("a", 300, 16), ("b", 20, 4), ("c", 70, 6)]
    tables = [{"name": n, "rows": r, "dim": d, "precision": precision} for n, r, d in specs]
    stored = [quantize_table(table(r, d, seed=i), precision) for i, (_, r, d) in enumerate(specs)]
    lookups = [[n, n] for n, _, _ in specs]
    fb = ServingLookup(tables, stored, lookups, backend="fbgemm")
    assert fb.backends == ["fbgemm"] * 3
    th = ServingLookup(tables, stored, lookups, backend="torch")
    values, offsets, w = bags(3, 33, [300, 20, 70], seed=4)
    assert torch.allclose(fb(values, offsets), th(values, offsets), atol=1e-5)
    assert torch.allclose(fb(values, offsets, w), th(values, offsets, w), atol=1e-5)
