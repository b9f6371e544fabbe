"""Calibration of Mixture-of-Experts layers (llmquant/nn/experts.py): every expert of an
experts module quantized from statistics of all calibration tokens, as the block's forward reaches it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..nn.experts import PROJECTIONS


def calibrate_experts(
    module: nn.Module,
    x: torch.Tensor,
    hessian: Callable[[torch.Tensor], torch.Tensor],
    quantize: Callable[[str, int, torch.Tensor, torch.Tensor], torch.Tensor],
) -> None:
    """Quantize every expert of a float experts module from statistics of all calibration tokens.

    x: [T, H] the experts' input (every token, routed or not). Every expert gets the same
    H = hessian(x) for its gate_up_proj; then its down_proj's input act(gate) * up is computed
    for all tokens with its already quantized gate_up_proj (sequential, as for linears) and gives
    that expert's down_proj Hessian [I, I]. quantize(projection, expert, W [N, K] float32, H [K, K])
    returns the dequantized W; it replaces the module's weight, so the block's forward after this
    runs (routed) with quantized experts. Why all tokens: docs/METHODS.md, "Mixture of Experts".
    """
    flat = x.reshape(-1, x.shape[-1]).float()
    h = hessian(flat)
    gate_up, down = module.gate_up_proj, module.down_proj
    for expert in range(gate_up.shape[0]):
        weight = quantize("gate_up_proj", expert, gate_up[expert].detach(), h)
        gate_up.data[expert].copy_(weight.to(gate_up.dtype))
        gate, up = (flat @ gate_up[expert].float().t()).chunk(2, dim=-1)
        inner = module.act_fn(gate) * up
        weight = quantize("down_proj", expert, down[expert].detach(), hessian(inner))
        down.data[expert].copy_(weight.to(down.dtype))


@contextlib.contextmanager
def experts_calibration(
    modules: dict[nn.Module, str],
    quantize: Callable[[str, torch.Tensor, torch.Tensor], tuple[object, torch.Tensor]],
    hessian: Callable[[torch.Tensor], torch.Tensor],
    results: dict[str, list],
) -> Iterator[None]:
    """While entered, each float experts module of `modules` ({module: qualified name}) is
    quantized by `calibrate_experts` when the block's forward first reaches it, before it runs.
    quantize(name, W [N, K], H [K, K]) -> (what to keep, dequantized W); results receives
    {"<name>.<projection>": [kept result of expert 0, 1, ...]}."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        name = modules[module]
        found: dict[str, list] = {f"{name}.{proj}": [] for proj in PROJECTIONS}

        def one(proj: str, expert: int, weight: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
            kept, dequantized = quantize(f"{name}.{proj}[{expert}]", weight, h)
            found[f"{name}.{proj}"].append(kept)
            return dequantized

        calibrate_experts(module, args[0] if args else kwargs["hidden_states"], hessian, one)
        results.update(found)

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
