"""The RTN formulas against a float64 reference, and their edge cases."""

import pytest
import torch
from llmquant.kernels import dequantize, pack_codes, unpack_codes

from llmquant.methods.codes import num_groups, quantize_rtn, quantize_weight


def reference_rtn(weight: torch.Tensor, bits: int, group_size: int, sym: bool, scales: torch.Tensor):
    """Codes by the formulas of docs/FORMAT.md in float64, given the stored scales [G, N]."""
    n, k = weight.shape
    group = k if group_size == -1 else group_size
    w = weight.double()
    scale = scales.double().t().repeat_interleave(group, dim=1)[:, :k]
    if sym:
        half = 2 ** (bits - 1)
        return torch.clamp(torch.round(w / scale), -half, half - 1) + half, None
    padded = torch.nn.functional.pad(w, (0, num_groups(k, group_size) * group - k), value=float("nan"))
    groups = padded.view(n, -1, group)
    lo = torch.nan_to_num(groups, nan=float("inf")).amin(-1).clamp(max=0)
    zero = torch.clamp(torch.round(-lo / scales.double().t()), 0, 2**bits - 1)
    zero_full = zero.repeat_interleave(group, dim=1)[:, :k]
    return torch.clamp(torch.round(w / scale) + zero_full, 0, 2**bits - 1), zero


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256, -1])
@pytest.mark.parametrize("sym", [False, True])
def test_rtn_matches_float64_reference(bits, group_size, sym):
    torch.manual_seed(bits * 1000 + group_size + sym)
    weight = torch.randn(48, 300) * 0.05  # 300: a ragged last group for every group size
    result = quantize_rtn(weight, bits, group_size, sym)
    assert result.codes.dtype == torch.uint8 and result.codes.shape == (48, 300)
    assert result.scales.shape == (num_groups(300, group_size), 48)
    ref_codes, ref_zero = reference_rtn(weight, bits, group_size, sym, result.scales)
    # float32 and float64 may round an exact .5 tie differently: allow one step, rarely
    diff = (result.codes.double() - ref_codes).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
    if not sym:
        assert torch.equal(result.zeros.double(), ref_zero.t())
    # every weight is reconstructed within half a step (one step at a clamped edge in sym)
    rebuilt = dequantize(
        pack_codes(result.codes, bits), result.scales, result.zeros, bits, group_size, 300, dtype=torch.float64
    )
    group = 300 if group_size == -1 else group_size
    step = result.scales.double().t().repeat_interleave(group, dim=1)[:, :300]
    slack = 1.0 if sym else 0.5 + 1e-6
    assert ((rebuilt - weight.double()).abs() <= slack * step + 1e-12).all()


def test_seed_article_symmetric_int8():
    weight = torch.tensor([[-10.0, 5.0, -7.5, 10.0]])
    result = quantize_rtn(weight, 8, -1, sym=True, scale_dtype=torch.float64)
    assert result.scales.item() == pytest.approx(10 / 127)
    signed = result.codes.long() - 128
    assert signed.tolist() == [[-127, 64, -95, 127]]


def test_all_positive_range_stays_in_range_and_round_trips():
    weight = torch.linspace(10, 260, 251).view(1, -1)
    result = quantize_rtn(weight, 8, -1, sym=False, scale_dtype=torch.float64)
    assert int(result.codes.max()) <= 255 and int(result.codes.min()) >= 0
    rebuilt = dequantize(pack_codes(result.codes, 8), result.scales, result.zeros, 8, -1, 251, dtype=torch.float64)
    step = result.scales.item()
    assert (rebuilt - weight.double()).abs().max() <= step


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_constant_zero_and_tiny_groups_are_finite(sym, dtype):
    weight = torch.zeros(4, 64, dtype=dtype)
    weight[1] = 3.0  # constant group
    weight[2] = 1e-30 if dtype != torch.float16 else 1e-7  # tiny, below fp16 normals
    weight[3, :32] = -2.5
    result = quantize_rtn(weight, 4, 32, sym)
    assert torch.isfinite(result.scales.float()).all() and (result.scales.float() > 0).all()
    rebuilt = dequantize(pack_codes(result.codes, 4), result.scales, result.zeros, 4, 32, 64, dtype=torch.float64)
    assert torch.isfinite(rebuilt).all()
    assert rebuilt[0].abs().max() == 0  # all-zero stays exactly zero
    assert torch.allclose(rebuilt[1], torch.full((64,), 3.0, dtype=torch.float64), rtol=0.2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_inf_are_refused_naming_the_tensor(bad):
    weight = torch.randn(8, 32)
    weight[3, 7] = bad
    with pytest.raises(ValueError, match="model.layers.3.mlp.up_proj.weight"):
        quantize_weight(weight, 4, 32, False, name="model.layers.3.mlp.up_proj.weight")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_round_trip_is_bit_exact(bits):
    for k in (1, 9, 64, 172, 576):
        codes = torch.randint(0, 2**bits, (33, k), dtype=torch.uint8)
        packed = pack_codes(codes, bits)
        assert packed.dtype == torch.int32 and packed.shape == (-(-k // (32 // bits)), 33)
        assert torch.equal(unpack_codes(packed, bits, k), codes)


def test_pack_bit_order_is_documented_order():
    # code k of a column sits at bits [4k, 4k+4) of its word: little-end first
    codes = torch.arange(8, dtype=torch.uint8).view(1, 8) + 8
    assert pack_codes(codes, 4).item() == int.from_bytes(bytes([0x98, 0xBA, 0xDC, 0xFE]), "little", signed=True)


def test_pack_refuses_out_of_range_codes():
    with pytest.raises(ValueError, match="codes must lie in"):
        pack_codes(torch.full((2, 8), 16), 4)
