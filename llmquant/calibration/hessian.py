"""The statistic calibrated quantizers receive: the Hessian of a linear's inputs."""

from __future__ import annotations

import torch

HESSIAN_PANEL = 192  # columns per panel of the Hessian's upper triangle


def input_hessian(x: torch.Tensor) -> torch.Tensor:
    """H = 2 X^T X / n: [K, K] float32 of a linear's inputs x: [n, K] float32.

    H is symmetric: only the panels on and above the diagonal are multiplied (about 60% of the
    full product's FLOPs for K = 1536) and mirrored. Each entry is a float32 dot product over all
    n rows, as in the full x.t() @ x (bit-identical to it with the CPU BLAS measured).
    """
    n, k = x.shape
    h = torch.empty(k, k, dtype=x.dtype, device=x.device)
    for begin in range(0, k, HESSIAN_PANEL):
        end = min(begin + HESSIAN_PANEL, k)
        h[begin:end, begin:] = x[:, begin:end].t() @ x[:, begin:]
        h[end:, begin:end] = h[begin:end, end:].t()
    return h.mul_(2.0 / n)
