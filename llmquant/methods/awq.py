"""Activation-aware per-channel scaling (AWQ, Lin et al. 2023), folded into the preceding norm.

Input channel j of the linears that read a norm's output is multiplied by s_j and the norm's
weight divided by s_j: the float function is unchanged, but channels with large activations get
a finer grid. s = mean|x|^alpha (normalised to geometric mean 1), alpha chosen on a grid to
minimise the activation-weighted weight error of all those linears together after round to
nearest, sum_j diag(H)_j (W_ij - Q(W s)_ij / s_j)^2; alpha = 0 (s = 1, no scaling) is a
candidate, so the search never makes that objective worse. The chosen method (rtn+clip or gptq)
then quantizes W s with the Hessian of the scaled inputs.

Linears whose input does not come from a norm (o_proj after attention, down_proj after the
gated activation) are left unscaled with a warning naming them: folding into v_proj would need
v and o to have matching shapes (not so with grouped-query attention) and folding into up_proj
is not implemented here.
"""

from __future__ import annotations

import torch

from ..quantize import quantize_rtn
from . import clip, gptq
from .grid import dequantize

ALPHAS = tuple(i / 10 for i in range(11))


def search_scales(
    weights: list[torch.Tensor], diag: torch.Tensor, absmean: torch.Tensor, bits: int, group_size: int, sym: bool
) -> torch.Tensor:
    """Per-input-channel scales s: [K] float32 for linears weights[i]: [N_i, K] reading inputs
    with diag(H): [K] and mean |x|: [K]."""
    w = torch.cat([x.float() for x in weights])
    base = absmean.float().clamp(min=1e-5)
    best, best_err = torch.ones_like(base), None
    for alpha in ALPHAS:
        s = base.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        q = dequantize(quantize_rtn(w * s, bits, group_size, sym, scale_dtype=torch.float32), bits, group_size)
        err = ((w - q / s).pow(2) * diag).sum()
        if best_err is None or err < best_err:
            best, best_err = s, err
    return best


# The per-weight quantizers used after scaling: AWQ's own (rtn + clipping search) and GPTQ.
quantize = clip.quantize
quantize_gptq = gptq.quantize
