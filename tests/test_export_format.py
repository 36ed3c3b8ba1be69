"""The export's storage formats: a table's parts packed into one tensor, and how a quantized
export encodes a method's own tensors (int8 for 2-D floats, keep bits for kept-row maps)."""
import pytest
import torch

from embtables.serving import method_tensors
from embtables.errors import ExportError
from embtables.serving.tensor_blob import pack_parts, unpack_parts


def test_packed_parts_round_trip_bit_exact():
    g = torch.Generator().manual_seed(0)
    parts = {"codes": torch.randint(0, 256, (5, 3), generator=g, dtype=torch.uint8),  # 15 bytes: the next part is unaligned
             "scale": torch.randn(5, generator=g).half(), "bias": torch.randn(2, 3, generator=g)}
    packed, layout = pack_parts(parts)
    assert packed.dtype == torch.uint8 and packed.numel() == 15 + 10 + 24
    back = unpack_parts(packed, layout)
    assert list(back) == list(parts)
    for role, t in parts.items():
        assert back[role].dtype == t.dtype and torch.equal(back[role], t)
    # One part (an fp32 table) is stored as the tensor itself.
    w = torch.randn(4, 2)
    alone, one = pack_parts({"weight": w})
    assert alone.dtype == torch.float32 and torch.equal(unpack_parts(alone, one)["weight"], w)
    with pytest.raises(ExportError, match="does not hold"):
        unpack_parts(packed[:-1], layout)
    with pytest.raises(ExportError, match="does not hold"):
        unpack_parts(torch.cat([packed, packed[:1]]), layout)


def encoded(t, quantize):
    encoding, parts = method_tensors.encode(t, quantize)
    entry = {"encoding": encoding, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
    packed, layout = pack_parts(parts)
    return encoding, sum(p.numel() * p.element_size() for p in parts.values()), \
        method_tensors.decode(entry, unpack_parts(packed, layout))


def test_fp32_exports_keep_method_tensors_as_trained():
    for t in (torch.randn(6, 16), torch.tensor([-1, 0, -1, 1], dtype=torch.int32), torch.tensor(0.3)):
        encoding, nbytes, back = encoded(t, "none")
        assert encoding == "none" and torch.equal(back, t) and nbytes == t.numel() * t.element_size()


@pytest.mark.parametrize("quantize", ["int8", "int4", "binary"])
def test_quantized_exports_store_2d_floats_as_int8(quantize):
    t = torch.randn(6, 16) * torch.linspace(0.1, 3, 6)[:, None]  # rows of different ranges
    encoding, nbytes, back = encoded(t, quantize)
    assert encoding == "int8" and nbytes == 6 * 16 + 6 * 2  # codes + one fp16 scale a row
    assert back.dtype == t.dtype and back.shape == t.shape
    step = t.abs().max(dim=1, keepdim=True).values / 127
    assert ((back - t).abs() <= step * 0.51).all() and not torch.equal(back, t)


def test_kept_row_maps_become_one_bit_per_id_exactly():
    keep = torch.rand(1001, generator=torch.Generator().manual_seed(1)) < 0.3
    row_of = torch.full((1001,), -1, dtype=torch.int32)
    row_of[keep] = torch.arange(int(keep.sum()), dtype=torch.int32)
    encoding, nbytes, back = encoded(row_of, "int8")
    assert encoding == "keep_bits" and nbytes == 126  # ⌈1001 / 8⌉
    assert back.dtype == torch.int32 and torch.equal(back, row_of)
    # Integers that are not such a map, and scalars, stay as they are.
    for t in (torch.tensor([0, 2, 1]), torch.tensor([-2, 0]), torch.tensor(0.5), torch.tensor([1.0, -1.0])):
        encoding, _, back = encoded(t, "int8")
        assert encoding == "none" and torch.equal(back, t)
    with pytest.raises(ExportError, match="unknown method tensor encoding"):
        method_tensors.decode({"encoding": "zip", "dtype": "int32", "shape": [3]}, {})
