"""Which float modules are linear layers llmquant quantizes: `nn.Linear` (weight [N, K]) and
transformers' `Conv1D` (GPT-2, GPT-J-style checkpoints: y = x W + b with weight [K, N], a transposed
linear). `linear_weight` gives every one of them as an [N, K] view, so planning, quantizing and
writing see one layout; the written tensors are QuantLinear's (docs/FORMAT.md), which the
transformers integration swaps in for either module type."""

from __future__ import annotations

import torch
from torch import nn

try:  # transformers' transposed linear (GPT-2); absent from a bare torch install
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = ()  # isinstance(x, ()) is always False


def is_linear(module: nn.Module) -> bool:
    """An nn.Linear or a transformers Conv1D: a layer llmquant can quantize."""
    return isinstance(module, nn.Linear) or isinstance(module, Conv1D)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as [N out, K in] (for Conv1D a transposed view of its [K, N] parameter:
    writing into the view writes the parameter)."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features K, out_features N) of an nn.Linear or Conv1D."""
    if isinstance(module, Conv1D):
        return module.nx, module.nf
    return module.in_features, module.out_features


def transposed(module: nn.Module) -> bool:
    """True when the stored weight is [K, N] (Conv1D) rather than nn.Linear's [N, K]."""
    return isinstance(module, Conv1D)
