"""`clip`: round to nearest with a per-group clipping search weighted by activation statistics.

For each group of each row the range is shrunk by the ratio r (from `grid.CLIP_RATIOS`) that
minimises d H_gg d^T, d = w - Q(w; r): the output error of that group on the calibration
activations (H_gg = the group's block of 2 X^T X / n). Without a Hessian it minimises the plain
weight error. r = 1 (round to nearest) is a candidate and wins ties.
"""

from __future__ import annotations

import torch

from .codes import QuantizedWeight, check_finite, group_params, to_codes
from .grid import group_spans, search_clip


def quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    bits: int,
    group_size: int,
    sym: bool,
    scale_dtype: torch.dtype,
    name: str = "weight",
) -> QuantizedWeight:
    """Codes of W: [N, K] with a clipped range per group. hessian: [K, K] float or None.

    Returns codes [N, K] uint8, scales [G, N] scale_dtype, zeros [G, N] uint8 (None when sym).
    """
    check_finite(weight, name)
    w = weight.float()
    n, k = w.shape
    codes = torch.empty(n, k, dtype=torch.uint8, device=w.device)
    scales, zeros = [], []
    for begin, end in group_spans(k, group_size):
        block = None if hessian is None else hessian[begin:end, begin:end].float()
        ratio = search_clip(w[:, begin:end], block, bits, sym, scale_dtype)
        scale, zero = group_params(w[:, begin:end], bits, sym, scale_dtype, ratio)
        codes[:, begin:end] = to_codes(w[:, begin:end], scale, zero, bits).to(torch.uint8)
        scales.append(scale)
        zeros.append(zero)
    return QuantizedWeight(
        codes=codes,
        scales=torch.stack(scales).to(scale_dtype),
        zeros=None if sym else torch.stack(zeros).to(torch.uint8),
    )
