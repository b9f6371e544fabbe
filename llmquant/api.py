"""The public entry points: `llmquant.load` (any of the three formats into a model running on
llmquant's kernels) and `llmquant.quantize_` (a model in memory)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint.source import read_model_config, safetensors_names, weight_files
from .config import QuantConfig
from .formats import detect_format
from .methods.presets import get_preset
from .nn.surgery import quantizable_layers, round_to_nearest_


def checkpoint_format(path: str | Path) -> str | None:
    """"llmquant", "gptq", "compressed-tensors", or None (floating point) for a model folder."""
    # CheckpointError naming config.json (missing, unreadable, a list, ...)
    config = read_model_config(Path(path).expanduser(), links=True)
    return detect_format(config.get("quantization_config"))


def load(path: str | Path, **from_pretrained_kwargs: Any) -> Any:
    """AutoModelForCausalLM of the folder `path` with QuantLinear layers on llmquant's kernels.

    An llmquant (or floating-point) folder is loaded as it is. A GPTQ or compressed-tensors
    folder is first converted, bit for bit, into a temporary llmquant folder (disk space: one
    copy of the quantized weights) that is deleted once the weights are in memory. The
    keyword arguments go to `from_pretrained` (dtype, device_map, output_loading_info...).
    """
    from transformers import AutoModelForCausalLM

    from . import hf
    from .checkpoint.convert import convert_checkpoint

    hf.register()
    fmt = checkpoint_format(path)
    if fmt in (None, "llmquant"):
        folder = Path(path).expanduser()
        if folder.is_dir():  # a truncated or foreign shard is named here, not deep inside transformers
            for file in weight_files(folder):
                if file.suffix == ".safetensors":
                    safetensors_names(file)
        return AutoModelForCausalLM.from_pretrained(path, **from_pretrained_kwargs)
    with tempfile.TemporaryDirectory(prefix="llmquant-load-") as scratch:
        converted = Path(scratch) / "model"
        convert_checkpoint(str(path), converted, "llmquant", progress=False)
        loaded = AutoModelForCausalLM.from_pretrained(converted, **from_pretrained_kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model.config._name_or_path = str(path)
        # the weights are in memory now: nothing may read the scratch folder lazily after this
        return loaded


@torch.no_grad()
def quantize_(model: nn.Module, config: QuantConfig, progress: bool = True, calibration=None) -> nn.Module:
    """Quantize `model` in place: every selected nn.Linear becomes a QuantLinear (codes chosen
    by config.method, scales in the weight's dtype). Returns the model.

    Calibrated methods ("gptq", "clip") need `calibration`: a `llmquant.CalibrationSet`
    (`llmquant.load_calibration(tokenizer)`) or token ids [S, T] int64; they run block by
    block (see `llmquant.calibration.loop`) and record the calibration in model.config.
    """
    layers, experts = quantizable_layers(model, config)  # all or nothing: refused before converting any
    if get_preset(config.method).calibrated:
        from .calibration.commit import quantize_calibrated_

        return quantize_calibrated_(model, config, calibration, progress)
    return round_to_nearest_(model, config, progress, layers, experts)
