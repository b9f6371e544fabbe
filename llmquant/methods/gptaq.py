"""`gptaq`: GPTQ toward the float model's layer outputs (asymmetric calibration, as in GPTAQ,
Li et al. 2025).

GPTQ minimises ||X_q (Ŵ - W)ᵀ||: the layer's error on the inputs X_q it receives in the
quantized model, so the error that earlier layers left in X_q is never corrected. gptaq
minimises ||X_q Ŵᵀ - X_fp Wᵀ|| instead, X_fp being the same layer's inputs in the float model.
With H = 2 X_qᵀX_q / n, that is GPTQ's objective around the ridge least-squares target

    W* = argmin_V ||X_q Vᵀ - X_fp Wᵀ||² · 2/n + λ ||V - W||² = W + W D (H + λI)⁻¹,
    D = 2 (X_fp - X_q)ᵀ X_q / n,

so gptaq runs `gptq.quantize` on W* with the same H. The ridge λ = DAMP · mean diag(H) matters:
with GPTQ's usual 1% the target fits the calibration tokens' noise and SmolLM2 int3 got worse
(+27.5 Δppl on 4 windows against +20.0); 0.3-3 gave the same gain (KL to float -9%),
evals/results/int3-experiments/README.md.

`llmquant.calibration.loop` runs a second, float stream of hidden states through each block for X_fp
(methods registered with float_target=True) and calls `target_factor` once per distinct input.
"""

from __future__ import annotations

import torch

from . import gptq

DAMP = 1.0


def target_factor(
    x_float: torch.Tensor, x_quant: torch.Tensor, hessian: torch.Tensor, damp: float = DAMP
) -> tuple[torch.Tensor, torch.Tensor]:
    """(D: [K, K], L: [K, K] lower Cholesky factor of H + λI), float32, for `float_target`.

    x_float, x_quant: [n, K] float32, the same rows in the float and in the quantized model;
    hessian: [K, K] = 2 x_quantᵀ x_quant / n. Inputs that are always zero get a unit diagonal.
    """
    n = x_quant.shape[0]
    d = torch.mm((x_float - x_quant).t(), x_quant).mul_(2.0 / n)
    h = hessian.clone()
    diag = h.diagonal()
    dead = diag == 0
    lam = damp * diag.mean().clamp(min=torch.finfo(h.dtype).tiny)
    diag.add_(lam)
    diag[dead] = 1
    return d, torch.linalg.cholesky(h)


def float_target(weight: torch.Tensor, factor: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """W* = W + W D (H + λI)⁻¹: [N, K] float32 for W: [N, K] and target_factor's (D, L)."""
    d, lower = factor
    w = weight.float()
    return w + torch.cholesky_solve(torch.mm(w, d).t(), lower).t()


quantize = gptq.quantize
