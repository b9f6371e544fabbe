"""What transforms and the calibration loop find in and run on one decoder block: the norms
feeding its linears, its output, its forward with temporary hooks, the parameters a fold changed."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

ERROR_SAMPLES = 4  # samples whose float block output is recomputed for checks and the progress bar


def module_name(model: nn.Module, module: nn.Module) -> str | None:
    """The qualified name of `module` inside `model` (None if it is not there)."""
    return next((name for name, m in model.named_modules() if m is module), None)


def relative_change(got: torch.Tensor, expected: torch.Tensor) -> float:
    """||got - expected|| / ||expected||."""
    return ((got - expected).norm() / expected.norm().clamp(min=1e-30)).item()


def record_changed(
    block: nn.Module, block_name: str, touched: list[nn.Module], targets: dict, changed: dict[str, torch.Tensor]
) -> None:
    """Copy into `changed` (CPU) every parameter of the `touched` modules of a block, except the
    weights of quantized linears (those are written packed)."""
    names = {m: n for n, m in block.named_modules()}
    for module in dict.fromkeys(touched):
        name = f"{block_name}.{names[module]}"
        for key, value in module.named_parameters(recurse=False):
            if not (key == "weight" and name in targets):
                changed[f"{name}.{key}"] = value.detach().to("cpu", copy=True)


def rows(value, count: int, total: int):
    """The first `count` samples of a batched tensor (dim 0 == total), recursively through
    tuples, lists and dicts (the block's keyword arguments: an eager attention mask is [S, 1, T, T]);
    others as is."""
    if isinstance(value, torch.Tensor):
        return value[:count] if value.dim() > 0 and value.shape[0] == total and total > 1 else value
    if isinstance(value, tuple | list):
        return type(value)(rows(v, count, total) for v in value)
    if isinstance(value, dict):
        return {k: rows(v, count, total) for k, v in value.items()}
    return value


def is_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return "norm" in type(module).__name__.lower() and isinstance(weight, torch.Tensor) and weight.dim() == 1


def norm_inputs(block: nn.Module, linears: list | dict, hidden: torch.Tensor, kwargs: dict) -> dict:
    """{linear: (norm, [linears reading that norm's output])} for linears whose input is exactly
    a norm's output, found by one forward pass of one sample."""
    outputs, readers, handles = {}, {}, []
    for module in block.modules():
        if is_norm(module):
            handles.append(module.register_forward_hook(lambda m, a, out: outputs.__setitem__(id(out), (m, out))))
    for module in linears:
        handles.append(
            module.register_forward_pre_hook(lambda m, a: readers.__setitem__(m, outputs.get(id(a[0]), (None,))[0]))
        )
    try:
        block(hidden, **kwargs)
    finally:
        for h in handles:
            h.remove()
    groups: dict = {}
    for linear, norm in readers.items():
        if norm is not None:
            groups.setdefault(norm, []).append(linear)
    return {linear: (norm, groups[norm]) for linear, norm in readers.items() if norm is not None}


def output(result) -> torch.Tensor:
    """The hidden states a decoder block returned (alone or first of a tuple)."""
    return result[0] if isinstance(result, tuple | list) else result


def run_hooked(block: nn.Module, modules, hook: Callable, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The block's output on `hidden`, with `hook` a forward pre-hook of each of `modules` for this pass only."""
    handles = [m.register_forward_pre_hook(hook) for m in modules]
    try:
        return output(block(hidden, **kwargs))
    finally:
        for h in handles:
            h.remove()
