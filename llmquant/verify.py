"""Load-time checks: a quantized checkpoint loads exactly as its config says, or not at all.

transformers only warns about missing or unexpected tensors and fills the gaps with fresh random
values, so a config.json that disagrees with the tensors (sym flipped, another group size, a
layer listed in modules_to_not_convert or not) would load "successfully" and score as garbage.
Here the tensors the checkpoint holds for every QuantLinear are compared with what the config
makes it expect, before anything is loaded, and a mismatch is refused naming the module.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import QUANT_METHOD, QuantConfig
from .experts import QuantExperts
from .linear import QuantLinear
from .shards import DTYPES


class QuantizedCheckpointError(ValueError):
    """The checkpoint's tensors do not match its quantization_config."""


def _describe(config: QuantConfig) -> str:
    return f"bits={config.bits}, group_size={config.group_size}, sym={config.sym}"


def checkpoint_shapes(files: Iterable[str | Path]) -> dict[str, tuple[torch.dtype | None, tuple[int, ...]]]:
    """{tensor name: (dtype, shape)} from the headers of safetensors files (no data is read)."""
    from safetensors import safe_open

    found: dict[str, tuple[torch.dtype | None, tuple[int, ...]]] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                view = handle.get_slice(name)
                found[name] = (DTYPES.get(view.get_dtype()), tuple(view.get_shape()))
    return found


def _by_model_names(model: nn.Module, found: dict) -> dict:
    """`found` keyed by the names transformers loads each tensor under (its conversion rules, e.g.
    Mixtral's saved `block_sparse_moe` is the model's `mlp`); merged float tensors are listed
    under their target with no shape (they are never a quantized module's)."""
    from .conversion import Conversion

    conversion = Conversion(model, list(found))
    if not conversion.renames_anything:
        return found
    return {
        key: found[group.sources[0]] if group.converter is None else (None, ())
        for key, group in conversion.groups.items()
    }


def check_checkpoint(model: nn.Module, config: QuantConfig, files: Iterable[str | Path] | None) -> None:
    """Every QuantLinear of `model` (built from `config`) must find exactly its buffers, with its
    shapes and dtypes, in the checkpoint `files`; raises QuantizedCheckpointError naming the first
    module that does not. Files that are not safetensors are not inspected."""
    files = [f for f in files or [] if str(f).endswith(".safetensors")]
    if not files:
        return
    found = _by_model_names(model, checkpoint_shapes(files))
    by_module: dict[str, set[str]] = {}
    for name in found:
        module, _, leaf = name.rpartition(".")
        by_module.setdefault(module, set()).add(leaf)
    modules = dict(model.named_modules())
    for name, leaves in by_module.items():  # a layer stored quantized must be loaded quantized
        stored_quantized = any(leaf == "qweight" or leaf.endswith("_qweight") for leaf in leaves)
        if stored_quantized and name in modules and not isinstance(modules[name], QuantLinear | QuantExperts):
            raise QuantizedCheckpointError(
                f"llmquant: module {name!r} is stored quantized (qweight) but quantization_config "
                f"({_describe(config)}, modules_to_not_convert={config.modules_to_not_convert}) keeps it in "
                "floating point; config.json and the weights disagree, refusing to load"
            )
    for name, module in modules.items():
        if not isinstance(module, QuantLinear | QuantExperts):
            continue
        expected = {
            key: tensor
            for key, tensor in (*module.named_buffers(recurse=False), *module.named_parameters(recurse=False))
            if key in module.state_dict()  # persistent only (not the CPU kernel's copies)
        }
        held = by_module.get(name, set())
        problem = None
        if held - expected.keys() or expected.keys() - held:
            parts = []
            if expected.keys() - held:
                parts.append(f"missing {', '.join(sorted(expected.keys() - held))}")
            if held - expected.keys():
                parts.append(f"unexpected {', '.join(sorted(held - expected.keys()))}")
            problem = " and ".join(parts)
        else:
            for key, tensor in expected.items():
                dtype, shape = found[f"{name}.{key}"]
                float_ok = key.endswith(("scales", "bias")) and dtype is not None and dtype.is_floating_point
                if shape != tuple(tensor.shape) or not (float_ok or dtype == tensor.dtype):
                    problem = f"{key} is {dtype} {list(shape)}, expected {tensor.dtype} {list(tensor.shape)}"
                    break
        if problem:
            raise QuantizedCheckpointError(
                f"llmquant: module {name!r} does not match quantization_config ({_describe(config)}): {problem}; "
                "config.json and the weights disagree, refusing to load"
            )


def check_loaded(model: nn.Module, config: QuantConfig) -> None:
    """After loading: every QuantLinear carries the config's bits/group size/sym and buffers of
    the shapes they imply, none left on the meta device."""
    for name, module in model.named_modules():
        if isinstance(module, QuantExperts):
            _check_loaded_experts(name, module, config)
        if not isinstance(module, QuantLinear):
            continue
        reference = QuantLinear(
            module.in_features,
            module.out_features,
            config.bits,
            config.group_size,
            config.sym,
            bias=module.bias is not None,
            device="meta",
        )
        same = (module.bits, module.group_size, module.sym) == (config.bits, config.group_size, config.sym)
        for key, tensor in reference.named_buffers():
            actual = getattr(module, key)
            if actual is None or tuple(actual.shape) != tuple(tensor.shape):
                same = False
        if (module.qzeros is None) != config.sym:
            same = False
        if not same:
            raise QuantizedCheckpointError(
                f"llmquant: module {name!r} was not loaded as quantization_config says ({_describe(config)})"
            )


def _check_loaded_experts(name: str, module: QuantExperts, config: QuantConfig) -> None:
    reference = QuantExperts(module.shapes, config.bits, config.group_size, config.sym, nn.Identity(), device="meta")
    same = (module.bits, module.group_size, module.sym) == (config.bits, config.group_size, config.sym)
    for key, tensor in reference.named_buffers():
        actual = getattr(module, key, None)
        if actual is None or actual.is_meta or tuple(actual.shape) != tuple(tensor.shape):
            same = False
    if not same:
        raise QuantizedCheckpointError(
            f"llmquant: experts {name!r} were not loaded as quantization_config says ({_describe(config)})"
        )


def looks_like_llmquant(quantization_config: Any) -> bool:
    """A quantization_config dict with llmquant's own fields (whatever its quant_method says)."""
    return isinstance(quantization_config, dict) and {"bits", "group_size", "sym", "format_version"} <= set(
        quantization_config
    )


def guard_unknown_quant_method() -> None:
    """Make transformers refuse, instead of skipping with a warning, a quantization_config that
    is llmquant's but names an unknown quant_method (a typo would load random weights)."""
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AutoHfQuantizer

    original = AutoHfQuantizer.supports_quant_method
    if getattr(original, "_llmquant_guard", False):
        return

    def supports_quant_method(quantization_config_dict: dict) -> bool:
        method = quantization_config_dict.get("quant_method")
        if method not in AUTO_QUANTIZATION_CONFIG_MAPPING and looks_like_llmquant(quantization_config_dict):
            raise QuantizedCheckpointError(
                f"quantization_config.quant_method is {method!r}, which transformers does not know, but the "
                f"config is llmquant's; set quant_method to {QUANT_METHOD!r} (loading would give random weights)"
            )
        return original(quantization_config_dict)

    supports_quant_method._llmquant_guard = True  # type: ignore[attr-defined]
    AutoHfQuantizer.supports_quant_method = staticmethod(supports_quant_method)
