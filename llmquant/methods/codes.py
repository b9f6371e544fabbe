"""Round-to-nearest group-wise quantization: W -> (codes, scales, zeros), as plain tensor functions.

Formulas (docs/FORMAT.md): per group of `group_size` consecutive input columns of a row,
- asymmetric: the range is widened to include 0 (lo = min(min, 0), hi = max(max, 0)), so the
  zero point is an exact code in [0, 2^b - 1] and no code ever leaves the range even for an
  all-positive group; scale = (hi - lo) / (2^b - 1), zero = round(-lo / scale),
  code = clamp(round(W / scale) + zero, 0, 2^b - 1);
- symmetric: scale = max|W| / (2^(b-1) - 1), q = clamp(round(W / scale), -(2^(b-1)), 2^(b-1) - 1),
  stored as the unsigned code q + 2^(b-1) (the implicit zero).
W ≈ (code - zero) * scale. Codes are computed with the scale as stored (rounded to its dtype),
so that dequantization reproduces exactly what the rounding saw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.layout import check_bits, effective_group_size, implicit_zero, num_groups, pack_codes


@dataclass
class QuantizedWeight:
    """A quantized [N, K] weight before packing.

    codes: [N, K] uint8 unsigned codes; scales: [G, N] float; zeros: [G, N] uint8 or None (sym).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None


def _grouped(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K] -> [N, G, group], the last group padded with zeros. Padding never changes a group's
    range: both formulas widen the range to include 0."""
    n, k = weight.shape
    group = effective_group_size(group_size, k)
    groups = num_groups(k, group_size)
    padded = weight.new_zeros(n, groups * group)
    padded[:, :k] = weight
    return padded.view(n, groups, group)


def _storable(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round scales to the storage dtype; a zero scale (all-zero group, underflow) becomes the
    smallest positive value of that dtype so nothing ever divides by zero."""
    stored = scale.to(dtype)
    info = torch.finfo(dtype)
    # 16-bit scales of tiny groups live in the subnormal range; keep the smallest one there.
    smallest = info.smallest_normal * (info.eps if info.bits == 16 else 1.0)
    return torch.where(stored > 0, stored, torch.tensor(smallest, dtype=dtype, device=stored.device))


def group_params(
    w: torch.Tensor, bits: int, sym: bool, scale_dtype: torch.dtype, ratio: torch.Tensor | float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero of groups along the last dim. w: [..., g] float; ratio: scalar or [...].

    r = 1 is round to nearest; r < 1 clips the range (calibrated methods search it). Returns
    scale [...] (w's dtype, values exactly representable in scale_dtype) and zero [...] (w's
    dtype, integer values; the implicit 2^(b-1) when symmetric).
    """
    max_code = (1 << bits) - 1
    if sym:
        half = implicit_zero(bits)
        scale = _storable(w.abs().amax(dim=-1) * ratio / (half - 1), scale_dtype).to(w.dtype)
        return scale, torch.full_like(scale, half)
    lo = w.amin(dim=-1).clamp(max=0) * ratio
    hi = w.amax(dim=-1).clamp(min=0) * ratio
    scale = _storable((hi - lo) / max_code, scale_dtype).to(w.dtype)
    zero = torch.clamp(torch.round(-lo / scale), 0, max_code)
    return scale, zero


def to_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Unsigned codes (w's dtype, integer values) of w: [..., m] with scale/zero [...], or of w: [...]
    with scale/zero of the same shape (one column). out: optional buffer of w's shape (may be w)."""
    if w.dim() == scale.dim() + 1:
        scale, zero = scale.unsqueeze(-1), zero.unsqueeze(-1)
    codes = w / scale if out is None else torch.div(w, scale, out=out)
    return codes.round_().add_(zero).clamp_(0, (1 << bits) - 1)


def check_finite(weight: torch.Tensor, name: str, refusing: str = "quantize it") -> None:
    """Raise ValueError naming the tensor if it holds NaN or Inf ("...; refusing to `refusing`")."""
    if not torch.isfinite(weight).all():
        bad = (~torch.isfinite(weight)).sum().item()
        raise ValueError(f"tensor {name!r} has {bad} NaN/Inf values; refusing to {refusing}")


def quantize_rtn(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    scale_dtype: torch.dtype | None = None,
    name: str = "weight",
) -> QuantizedWeight:
    """Round-to-nearest quantization of W: [N, K] float.

    scale_dtype: dtype the scales are stored in (default: W's dtype). Returns codes [N, K] uint8,
    scales [G, N] scale_dtype and zeros [G, N] uint8 (None when sym).
    """
    check_bits(bits)
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"tensor {name!r} must be a 2-D float weight, got {weight.dtype} {tuple(weight.shape)}")
    check_finite(weight, name)
    n, k = weight.shape
    scale_dtype = scale_dtype or weight.dtype
    groups = _grouped(weight.float(), group_size)  # [N, G, group]
    scale, zero = group_params(groups, bits, sym, scale_dtype)  # [N, G]
    codes = to_codes(groups, scale, zero, bits).reshape(n, -1)[:, :k].to(torch.uint8)
    zeros = None if sym else zero.t().to(torch.uint8).contiguous()
    return QuantizedWeight(codes=codes, scales=scale.t().to(scale_dtype).contiguous(), zeros=zeros)


def quantize_weight(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    method: str = "rtn",
    scale_dtype: torch.dtype | None = None,
    name: str = "weight",
) -> dict[str, torch.Tensor]:
    """Quantize and pack W: [N, K] into the stored tensors of one QuantLinear.

    Returns {"qweight": [ceil(K/V), N] int32, "scales": [G, N] scale_dtype} plus
    "qzeros": [G, N] uint8 when asymmetric.
    """
    if method != "rtn":  # the one method that needs no calibration activations (methods/presets.py)
        raise ValueError(
            f"method {method!r} needs calibration data; use llmquant.quantize_(model, config, calibration=...)"
        )
    quantized = quantize_rtn(weight, bits, group_size, sym, scale_dtype=scale_dtype, name=name)
    return pack(quantized, bits)


def pack(quantized: QuantizedWeight, bits: int) -> dict[str, torch.Tensor]:
    """The stored tensors of one QuantLinear from codes/scales/zeros (see quantize_weight)."""
    packed = {"qweight": pack_codes(quantized.codes, bits), "scales": quantized.scales}
    if quantized.zeros is not None:
        packed["qzeros"] = quantized.zeros
    return packed
