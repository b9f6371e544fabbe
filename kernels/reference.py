"""Torch reference for the packed layout: dequantize, and a float64 linear to test kernels against."""

from __future__ import annotations

import torch

from .layout import effective_group_size, unpack_codes


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Rebuild W [N, K] = (code - zero) * scale.

    qweight: [ceil(K/V), N] int32; scales: [G, N] float; qzeros: [G, N] uint8 or None for
    symmetric (implicit zero 2^(bits-1)); G = ceil(K / group_size). Returns `dtype`
    (default: the scales' dtype). The arithmetic is done in float32, or float64 if asked.
    """
    group = effective_group_size(group_size, in_features)
    codes = unpack_codes(qweight, bits, in_features)  # [N, K]
    out_dtype = dtype or scales.dtype
    work = torch.float64 if out_dtype == torch.float64 else torch.float32
    group_index = torch.arange(in_features, device=qweight.device) // group
    scale = scales.t().to(work)[:, group_index]  # [N, K]
    if qzeros is None:
        zero = float(1 << (bits - 1))
    else:
        zero = qzeros.t().to(work)[:, group_index]
    return ((codes.to(work) - zero) * scale).to(out_dtype)


def reference_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """x [..., K] @ dequantize(...)^T + bias, all in float64: the ground truth for kernels."""
    weight = dequantize(qweight, scales, qzeros, bits, group_size, x.shape[-1], dtype=torch.float64)
    out = x.to(torch.float64) @ weight.t()
    if bias is not None:
        out = out + bias.to(torch.float64)
    return out
