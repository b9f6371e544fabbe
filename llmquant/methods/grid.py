"""The quantization grid of one group for calibrated methods: clipping search, dequantization.

The formulas themselves (`group_params`, `to_codes`, with a clipping ratio r; r = 1 is round to
nearest) live in `llmquant.methods.codes` with RTN:
- asymmetric: lo = min(min(w), 0) * r, hi = max(max(w), 0) * r, scale = (hi - lo) / (2^b - 1),
  zero = round(-lo / scale); code = clamp(round(w / scale) + zero, 0, 2^b - 1);
- symmetric: scale = r * max|w| / (2^(b-1) - 1), implicit zero 2^(b-1), same clamp.
"""

from __future__ import annotations

import torch

from ..kernels.layout import dequantize_codes, effective_group_size, implicit_zero
from .codes import QuantizedWeight, group_params, to_codes

# Clipping ratios tried per group and row. 1.0 first: ties keep the unclipped range. For
# symmetric codes 8/7 (int4) lets a negative extreme use the otherwise unused code -2^(b-1).
CLIP_RATIOS = tuple(1.0 - 0.025 * i for i in range(21))


def clip_ratios(bits: int, sym: bool) -> torch.Tensor:
    """Candidate ratios r (float32 [R]) for the clipping search."""
    ratios = list(CLIP_RATIOS)
    if sym:
        half = implicit_zero(bits)
        ratios.append(half / (half - 1))
    return torch.tensor(ratios)


def from_codes(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """(codes - zero) * scale, broadcasting per-row scale/zero [N] over codes [N, m] or [N].
    out: optional buffer of codes' shape (may be codes)."""
    if codes.dim() == 2:
        scale, zero = scale.unsqueeze(1), zero.unsqueeze(1)
    return torch.sub(codes, zero, out=out).mul_(scale) if out is not None else (codes - zero).mul_(scale)


def search_clip(
    w: torch.Tensor, hessian: torch.Tensor | None, bits: int, sym: bool, scale_dtype: torch.dtype
) -> torch.Tensor:
    """Per row, the ratio r minimising the group's output error d H d^T, d = w - Q(w; r).

    w: [N, g] float; hessian: [g, g] (the group's block of 2 X^T X / n; None means the identity,
    i.e. plain weight error). Returns ratio [N] in w's dtype; r = 1 wins ties, so the result is
    never worse than round to nearest on this objective.

    One ratio at a time (an [N, g] working set stays in cache, all R at once would not), with
    the scales and zeros of all ratios computed up front and every step in place on two
    preallocated [N, g] buffers: to_codes / from_codes with out=.
    """
    ratios = clip_ratios(bits, sym).to(device=w.device, dtype=w.dtype)
    scales, zeros = group_params(w, bits, sym, scale_dtype, ratios.unsqueeze(1))  # [R, N]
    d = torch.empty_like(w, memory_format=torch.contiguous_format)
    hd = torch.empty_like(d) if hessian is not None else None
    best_err = None
    best = torch.zeros(w.shape[0], dtype=torch.long, device=w.device)
    for index in range(len(ratios)):
        from_codes(to_codes(w, scales[index], zeros[index], bits, out=d), scales[index], zeros[index], out=d)
        torch.sub(w, d, out=d)
        if hd is None:
            err = d.mul_(d).sum(1)
        else:
            err = torch.mm(d, hessian, out=hd).mul_(d).sum(1)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err  # strict: the earlier ratio (r = 1 first) wins ties
        best_err = torch.where(better, err, best_err)
        best.masked_fill_(better, index)
    return ratios[best]


def dequantize(q: QuantizedWeight, bits: int, group_size: int) -> torch.Tensor:
    """W: [N, K] float32 from codes/scales/zeros (what QuantLinear computes), for error checks."""
    return dequantize_codes(q.codes, q.scales, q.zeros, bits, group_size, torch.float32)


def group_spans(in_features: int, group_size: int) -> list[tuple[int, int]]:
    """[begin, end) column ranges of the groups of a row, the last one possibly shorter."""
    group = effective_group_size(group_size, in_features)
    return [(b, min(b + group, in_features)) for b in range(0, in_features, group)]
