"""kernels.layout, the one owner of the stored format, against the independent float64 reference."""

import pytest
import torch
from llmquant.kernels import layout
from llmquant.kernels.reference import reference_dequantize
from torch import nn

from llmquant import QuantConfig, QuantLinear
from llmquant.methods.codes import quantize_rtn


def random_packed(n, k, bits, group_size, sym, seed=0):
    torch.manual_seed(seed)
    groups = layout.num_groups(k, group_size)
    codes = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8)
    scales = torch.rand(groups, n) * 0.1 + 1e-3
    zeros = None if sym else torch.randint(0, 1 << bits, (groups, n), dtype=torch.uint8)
    return codes, scales, zeros


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 48, -1])
@pytest.mark.parametrize("sym", [False, True])
def test_dequantize_equals_the_reference(bits, group_size, sym):
    k = 300  # a ragged last group and a partly filled last word for every width
    codes, scales, zeros = random_packed(40, k, bits, group_size, sym, seed=bits + k)
    qweight = layout.pack_codes(codes, bits)
    expected = reference_dequantize(qweight, scales, zeros, bits, group_size, k)
    # in float64 both compute (code - zero) * scale exactly once: equal bit for bit
    got = layout.dequantize(qweight, scales, zeros, bits, group_size, k, dtype=torch.float64)
    assert got.shape == (40, k) and torch.equal(got, expected)
    from_codes = layout.dequantize_codes(codes, scales, zeros, bits, group_size, dtype=torch.float64)
    assert from_codes.shape == (40, k) and from_codes.is_contiguous() and torch.equal(from_codes, expected)
    # the default dtype is the scales' (float32 here): the float64 result rounded once
    assert torch.equal(layout.dequantize(qweight, scales, zeros, bits, group_size, k), expected.float())
    assert torch.equal(layout.dequantize_codes(codes, scales, zeros, bits, group_size), expected.float())


def test_dequantize_codes_leaves_its_inputs_alone():
    codes, scales, zeros = random_packed(8, 64, 4, 32, False)
    float_codes = codes.float()
    before = float_codes.clone()
    layout.dequantize_codes(float_codes, scales, zeros, 4, 32)
    assert torch.equal(float_codes, before)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [24, 1])
def test_unpack_of_a_transposed_view(bits, n):
    """Formats unpack zero points packed along N from a transposed view (strided; with one group
    it is [rows, 1] and counts as contiguous though its last stride is not 1)."""
    codes = torch.randint(0, 1 << bits, (n, 64), dtype=torch.uint8)
    packed = layout.pack_codes(codes, bits)
    words = packed.new_empty(packed.shape[::-1]).t().copy_(packed)  # as `.t()` of a loaded [G, rows]
    assert words.stride(-1) != 1
    assert torch.equal(layout.unpack_codes(words, bits, 64), codes)


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits,group_size,k", [(4, 128, 576), (3, 32, 300), (8, -1, 96), (2, 64, 64)])
def test_stored_tensors_are_what_quantlinear_and_quantize_hold(bits, group_size, k, sym):
    n = 24
    stored = layout.stored_tensors(n, k, bits, group_size, sym, torch.bfloat16)
    module = QuantLinear(k, n, bits, group_size, sym, bias=False, dtype=torch.bfloat16, device="meta")
    held = [(name, b.dtype, tuple(b.shape)) for name, b in module.named_buffers() if b is not None]
    assert [tuple(s) for s in stored] == held
    weight = torch.randn(n, k, dtype=torch.bfloat16)
    from llmquant.methods.codes import pack

    packed = pack(quantize_rtn(weight, bits, group_size, sym), bits)
    assert [(key, t.dtype, tuple(t.shape)) for key, t in packed.items()] == [tuple(s) for s in stored]


def test_implicit_zero_and_values_per_word():
    assert [layout.implicit_zero(b) for b in layout.SUPPORTED_BITS] == [2, 4, 8, 128]
    assert [layout.values_per_word(b) for b in layout.SUPPORTED_BITS] == [16, 10, 8, 4]
    assert layout.packed_rows(300, 3) == 30 and layout.num_groups(300, 128) == 3
    assert layout.group_index(5, 2).tolist() == [0, 0, 1, 1, 2]


@pytest.mark.parametrize("bad", [5, 0, True, 4.5, "4"])
def test_one_bits_check_with_one_message(bad):
    """Config, quantizer, packing and kernels refuse a width with the same words."""
    message = r"bits must be one of \[2, 3, 4, 8\]"
    with pytest.raises(ValueError, match=message):
        layout.check_bits(bad)
    with pytest.raises(ValueError, match=message):
        QuantConfig(bits=bad)
    with pytest.raises(ValueError, match=message):
        quantize_rtn(torch.randn(4, 32), bad, 32, False)
    with pytest.raises(ValueError, match=message):
        layout.values_per_word(bad)


@pytest.mark.parametrize("bad", [100, 0, True, -2])
def test_one_group_size_check(bad):
    with pytest.raises(ValueError, match=r"group_size must be one of \[32, 64, 128, 256, -1\]"):
        QuantConfig(group_size=bad)


def test_quantlinear_dequantize_is_the_layout_dequantizer():
    torch.manual_seed(3)
    module = QuantLinear.from_linear(nn.Linear(300, 40), 4, 128, False)
    args = (module.qweight, module.scales, module.qzeros, 4, 128, 300)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert torch.equal(module.dequantize(dtype), layout.dequantize(*args, dtype=dtype))
    assert torch.equal(module.dequantize(torch.float64), reference_dequantize(*args))
