"""`gptaq`: GPTQ toward the float model's layer outputs (asymmetric calibration, as in GPTAQ,
Li et al. 2025).

GPTQ minimises ||X_q (Ŵ - W)ᵀ||: the layer's error on the inputs X_q it receives in the
quantized model, so the error that earlier layers left in X_q is never corrected. gptaq
minimises ||X_q Ŵᵀ - X_fp Wᵀ|| instead, X_fp being the same layer's inputs in the float model.
With H = 2 X_qᵀX_q / n, that is GPTQ's objective around the ridge least-squares target

    W* = argmin_V ||X_q Vᵀ - X_fp Wᵀ||² · 2/n + λ ||V - W||² = W + W D (H + λI)⁻¹,
    D = 2 (X_fp - X_q)ᵀ X_q / n,

so gptaq runs `gptq.quantize` on W* with the same H. The ridge λ = DAMP · mean diag(H) is
much larger than GPTQ's usual 1%: with that, the target fits the calibration tokens' noise
(measurements: docs/METHODS.md, "gptaq").

`FloatTarget` is the calibration loop's hook: it runs a second, float stream of hidden states
through each block for X_fp and calls `target_factor` once per distinct input.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import run_hooked
from .transform import Transform

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


def float_inputs(block: nn.Module, modules: dict, hidden: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, dict]:
    """(output, {linear: its input [n, K] float32}) of one pass of the float block on `hidden`
    (linears sharing an input share the tensor)."""
    inputs = {}

    def hook(module, args):
        x = args[0]
        inputs[module] = x.reshape(-1, x.shape[-1]).float()

    return run_hooked(block, modules, hook, hidden, kwargs), inputs


class FloatTarget(Transform):
    """The calibration loop's hooks for gptaq: carry the float model's hidden states, run each
    float block on them before it is quantized (X_fp of every linear, the next block's float
    stream), and hand the quantizer W* instead of W."""

    def before_model(self, run) -> None:
        self.hidden = run.hidden  # the float model's hidden states (after any earlier transform)
        self.inputs: dict = {}
        self.factor: tuple[torch.Tensor, torch.Tensor] | None = None

    def before_quantize(self, run, block) -> None:
        self.hidden, self.inputs = float_inputs(block.block, block.names, self.hidden.to(run.device), block.kwargs)

    def on_input(self, module: nn.Module, x: torch.Tensor, hessian: torch.Tensor) -> None:
        self.factor = target_factor(self.inputs[module], x, hessian)

    def target(self, weight: torch.Tensor) -> torch.Tensor:
        return float_target(weight, self.factor)

    def after_block(self, run, block) -> None:
        self.inputs, self.factor = {}, None

