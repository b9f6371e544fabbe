"""Size accounting for quantized models: bits per weight and bytes."""

from __future__ import annotations

from torch import nn

from .linear import QuantLinear


def _nbytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def bits_per_weight(model: nn.Module) -> float | None:
    """Stored bits per weight over the quantized layers (packed codes + scales + zeros, bias
    excluded); None when nothing is quantized."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if not layers:
        return None
    weights = sum(m.in_features * m.out_features for m in layers)
    stored = sum(_nbytes(m) - (0 if m.bias is None else m.bias.numel() * m.bias.element_size()) for m in layers)
    return 8 * stored / weights


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (tied tensors counted once)."""
    seen = {}
    for tensor in (*model.parameters(), *model.buffers()):
        seen[tensor.data_ptr(), tensor.numel()] = tensor.numel() * tensor.element_size()
    return sum(seen.values())
