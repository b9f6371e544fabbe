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

import torch
from torch import nn

from ..config import QUANT_METHOD, QuantConfig
from ..errors import CheckpointError, QuantizedCheckpointError, first_line
from ..formats.llmquant import looks_like as looks_like_llmquant
from ..kernels.layout import stored_tensors
from ..nn.experts import QuantExperts
from ..nn.linear import QuantLinear
from .source import TensorReader, tensor_specs


def _describe(config: QuantConfig) -> str:
    return f"bits={config.bits}, group_size={config.group_size}, sym={config.sym}"


def checkpoint_shapes(files: Iterable[str | Path]) -> dict[str, tuple[torch.dtype | None, tuple[int, ...]]]:
    """{tensor name: (dtype, shape)} from the headers of safetensors files (no data is read)."""
    try:
        specs = tensor_specs([Path(path) for path in files])
    except CheckpointError as error:  # truncated or not safetensors, named
        raise QuantizedCheckpointError(f"llmquant: {first_line(error)}") from None
    return {spec.name: (spec.dtype, spec.shape) for spec in specs}


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
    check_stored_values(model, files)


def check_stored_values(model: nn.Module, files: list[str | Path]) -> None:
    """`check_values` for every QuantLinear of `model` on the scales and zeros stored in `files`,
    read before transformers loads anything (only those tensors: a G-th of the codes' size)."""
    wanted = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            wanted[f"{name}.scales"] = (name, module.bits)
            if not module.sym:
                wanted[f"{name}.qzeros"] = (name, module.bits)
    reader = TensorReader([Path(path) for path in files])
    values: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in reader.read([key for key in wanted if key in reader]).items():
        module, bits = wanted[key]
        values.setdefault(module, {"bits": bits})[key.rpartition(".")[2]] = tensor
    for module, stored in values.items():
        check_values(module, stored["bits"], stored["scales"], stored.get("qzeros"))


def check_values(module: str, bits: int, scales: torch.Tensor, qzeros: torch.Tensor | None) -> None:
    """Refuse stored values that make a layer meaningless, naming `module`: a scale that is NaN,
    infinite, zero or negative, a zero point outside [0, 2^bits).

    Every llmquant method stores positive scales (a zero one becomes the dtype's smallest positive
    value, docs/FORMAT.md), and so do the GPTQ and compressed-tensors producers (GPTQ widens an
    all-zero group's range, compressed-tensors clamps scales to a positive epsilon), so all three
    formats require scales > 0. Only scales and zeros are scanned (a G-th of the codes' size, and
    every code is in range by construction of the packing), so the check costs little at load."""
    if scales.is_floating_point():
        # one pass: `> 0` is False for NaN and -Inf, `< inf` for +Inf
        good = scales.gt(0).logical_and_(scales.lt(float("inf")))
        if not bool(good.all()):
            bad = ~good
            group, column = (int(i) for i in bad.nonzero()[0])
            value = float(scales[group, column])
            raise QuantizedCheckpointError(
                f"llmquant: module {module!r} has {int(bad.sum())} scales that are not finite and positive "
                f"(first: {value} at group {group}, output {column}); the checkpoint is corrupt, refusing to load"
            )
    if qzeros is not None and bits < 8:  # uint8 zeros of 8-bit codes are all in range
        top = int(qzeros.max()) if qzeros.numel() else 0
        if top >= 1 << bits:
            raise QuantizedCheckpointError(
                f"llmquant: module {module!r} has zero points up to {top}, outside [0, {1 << bits}) for {bits}-bit "
                "codes; the checkpoint is corrupt, refusing to load"
            )


def check_packed(module: str, packed: dict[str, torch.Tensor], n: int, k: int, config: QuantConfig) -> None:
    """llmquant tensors of one layer (`{"qweight", "scales", "qzeros"}`, as a format's
    import_layer returns them) against what a QuantLinear [n, k] of `config` holds: names, shapes,
    dtypes (scales any float dtype), then `check_values`. QuantizedCheckpointError naming `module`."""
    # scales may be any float dtype: only their shape is compared
    stored = stored_tensors(n, k, config.bits, config.group_size, config.sym, torch.float16)
    expected = {spec.name: spec for spec in stored}
    problem = None
    if packed.keys() != expected.keys():
        missing, extra = sorted(expected.keys() - packed.keys()), sorted(packed.keys() - expected.keys())
        problem = " and ".join(
            ([f"missing {', '.join(missing)}"] if missing else [])
            + ([f"unexpected {', '.join(extra)}"] if extra else [])
        )
    else:
        for key, spec in expected.items():
            value = packed[key]
            dtype_ok = value.is_floating_point() if key == "scales" else value.dtype == spec.dtype
            if tuple(value.shape) != spec.shape or not dtype_ok:
                want = "a float dtype" if key == "scales" else str(spec.dtype)
                problem = f"{key} is {value.dtype} {list(value.shape)}, expected {want} {list(spec.shape)}"
                break
    if problem:
        raise QuantizedCheckpointError(
            f"llmquant: module {module!r} does not match quantization_config ({_describe(config)}): {problem}; "
            "config.json and the weights disagree"
        )
    check_values(module, config.bits, packed["scales"], packed.get("qzeros"))


def check_loaded(model: nn.Module, config: QuantConfig) -> None:
    """After loading: every QuantLinear carries the config's bits/group size/sym and buffers of
    the shapes they imply, none left on the meta device."""
    for name, module in model.named_modules():
        if isinstance(module, QuantExperts):
            _check_loaded_experts(name, module, config)
        if not isinstance(module, QuantLinear):
            continue
        # the scales' dtype is the checkpoint's: only shapes are compared
        stored = stored_tensors(
            module.out_features, module.in_features, config.bits, config.group_size, config.sym, torch.float16
        )
        same = (module.bits, module.group_size, module.sym) == (config.bits, config.group_size, config.sym)
        for key, _, shape in stored:
            actual = getattr(module, key)
            if actual is None or tuple(actual.shape) != shape:
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
