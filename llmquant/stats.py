"""Size accounting, one definition for `llmquant quantize`, `llmquant eval` and the model card.

- bits per weight: over the QUANTIZED LINEAR LAYERS ONLY, the stored format tensors (packed
  codes with their K padding, scales, zero points; docs/FORMAT.md) in bits, divided by the
  layers' in x out weights. Bias, unquantized modules (embeddings, lm_head, norms) and the CPU
  kernel's repacked copy are not counted. Scales count at the checkpoint's float dtype (what
  `llmquant quantize` and `save_pretrained` write), not at the dtype a model was loaded to compute in.
- checkpoint size: bytes of every tensor written (the whole model), in MiB (2^20 bytes).
- memory: bytes of every parameter and buffer of a loaded model (the whole model, as loaded,
  tied tensors once, the CPU kernel's copy included), in MiB.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .kernels.layout import STORED_NAMES, bits_from_bytes
from .nn.linear import QuantLinear

MIB = 2**20


def format_bytes(layer: QuantLinear, scale_dtype: torch.dtype | None = None) -> int:
    """Stored bytes of one layer's format tensors, scales counted at `scale_dtype` (default: theirs)."""
    total = 0
    for name in STORED_NAMES:
        tensor = getattr(layer, name)
        if tensor is None:
            continue
        size = tensor.element_size()
        if name == "scales" and scale_dtype is not None:
            size = torch.empty((), dtype=scale_dtype).element_size()
        total += tensor.numel() * size
    return total


def bits_per_weight(model: nn.Module, scale_dtype: torch.dtype | None = None) -> float | None:
    """Bits per weight of the quantized linear layers (see the module docstring); None if none.

    scale_dtype: the checkpoint's float dtype when the model was loaded in another one
    (`checkpoint_dtype(folder)`); default: the scales' own dtype.
    """
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if not layers:
        return None
    weights = sum(m.in_features * m.out_features for m in layers)
    return bits_from_bytes(sum(format_bytes(m, scale_dtype) for m in layers), weights)


def model_size_bytes(model: nn.Module) -> int:
    """Memory of a loaded model: bytes of all parameters and buffers (tied tensors counted once)."""
    seen = {}
    for tensor in (*model.parameters(), *model.buffers()):
        seen[tensor.data_ptr(), tensor.numel()] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def checkpoint_dtype(folder: str | Path) -> torch.dtype | None:
    """The float dtype recorded in a model folder's config.json ("dtype" or "torch_dtype"), if any."""
    from .checkpoint.source import read_model_config

    try:
        config = read_model_config(Path(folder), links=True)
    except ValueError:  # CheckpointError: no config.json, or not one transformers could read
        return None
    name = config.get("dtype") or config.get("torch_dtype")
    value = getattr(torch, name, None) if isinstance(name, str) else None
    return value if isinstance(value, torch.dtype) and value.is_floating_point else None
