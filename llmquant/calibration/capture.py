"""The inputs of a model's decoder blocks: which ModuleList holds them, and the hidden states
and keyword arguments they receive for the calibration tokens."""

from __future__ import annotations

import torch
from torch import nn


class _Stop(Exception):
    """Raised by the capture hook once the first block's inputs are recorded."""


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, ModuleList) of the model's decoder blocks: the longest ModuleList."""
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(f"{type(model).__name__}: no decoder blocks (nn.ModuleList) found to calibrate")
    return max(lists, key=lambda item: len(item[1]))


def blocks_inputs(model: nn.Module, blocks: nn.ModuleList, tokens: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
    """Hidden states entering the first block for tokens [S, T], and every block's keyword
    arguments: they differ between blocks in families that mix attention types (Gemma-2/3:
    sliding-window and global masks, Gemma-3: local and global rotary embeddings per layer).

    One pass of the model with each block's forward replaced by a recorder that returns its input
    unchanged, so no block computes (a streamed skeleton's blocks are on the meta device); the
    pass stops after the last block."""
    captured: dict = {"kwargs": []}

    def recorder(*args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.setdefault("hidden", hidden)
        captured["kwargs"].append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        if len(captured["kwargs"]) == len(blocks):
            raise _Stop
        return hidden

    for block in blocks:
        block.forward = recorder  # an instance attribute: nn.Module.__call__ runs it, hooks included
    try:  # a streamed skeleton holds only what runs before the first block: the rest is on meta
        device = next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))
        model(input_ids=tokens.to(device), use_cache=False)
    except _Stop:
        pass
    finally:
        for block in blocks:
            del block.forward
    if len(captured["kwargs"]) != len(blocks):
        raise ValueError(
            f"the model called {len(captured['kwargs'])} of its {len(blocks)} decoder blocks; cannot calibrate it"
        )
    for kwargs in captured["kwargs"]:
        kwargs["use_cache"] = False
        kwargs.pop("past_key_values", None)
        kwargs.pop("past_key_value", None)
    return captured["hidden"], captured["kwargs"]


def block_inputs(model: nn.Module, block: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Hidden states entering `block` (the first decoder block) for tokens [S, T] and its keyword arguments."""
    _, blocks = decoder_blocks(model)
    hidden, kwargs = blocks_inputs(model, blocks, tokens)
    return hidden, kwargs[0]
