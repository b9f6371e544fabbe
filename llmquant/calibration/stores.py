"""Where the calibration loop gets each decoder block's weights from (`BlockStore`), and the
default store of an in-memory model (`ResidentBlocks`)."""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Iterator
from typing import Protocol

import torch
from torch import nn


def compute_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class BlockStore(Protocol):
    """Where quantize_blocks gets each decoder block's weights from, and what it does after."""

    def embeddings(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """While entered, the model can run from its input ids up to its first block."""
        ...

    def load(self, index: int, block: nn.Module, device: torch.device) -> nn.Module:
        """Block `index` with its weights on `device`: the block to run and quantize (it is changed)."""
        ...

    def release(self, index: int, block: nn.Module, work: nn.Module) -> None:
        """Block `index` is done; `work` is what `load` returned."""
        ...


def copy_to(module: nn.Module, device: torch.device) -> nn.Module:
    """A deep copy of `module` whose parameters and buffers are on `device` (copied straight
    there, never first a second copy where they are)."""
    memo: dict[int, torch.Tensor] = {}
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        moved = tensor.detach().to(device, copy=True)
        memo[id(tensor)] = nn.Parameter(moved, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else moved
    return copy.deepcopy(module, memo)


class ResidentBlocks:
    """The blocks of an in-memory model: each is quantized as a copy on the compute device, so the
    model is untouched until the caller commits the results (all or nothing). Costs one block's
    weights on the compute device, which moving the block there would cost too."""

    @contextlib.contextmanager
    def embeddings(self, model: nn.Module) -> Iterator[None]:
        yield

    def load(self, index: int, block: nn.Module, device: torch.device) -> nn.Module:
        return copy_to(block, device)

    def release(self, index: int, block: nn.Module, work: nn.Module) -> None:
        pass


def to_device(value, device: torch.device):
    """Tensors in `value` (recursively through tuples, lists and dicts) moved to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple | list):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):  # the keyword arguments themselves
        return {k: to_device(v, device) for k, v in value.items()}
    return value
