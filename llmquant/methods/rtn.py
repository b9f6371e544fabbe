"""`rtn`: round to nearest, no calibration (the default)."""

from __future__ import annotations

import torch

from .codes import QuantizedWeight, quantize_rtn


def quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    bits: int,
    group_size: int,
    sym: bool,
    scale_dtype: torch.dtype,
    name: str = "weight",
) -> QuantizedWeight:
    """Round-to-nearest codes of W: [N, K]; the Hessian is ignored."""
    return quantize_rtn(weight, bits, group_size, sym, scale_dtype=scale_dtype, name=name)
