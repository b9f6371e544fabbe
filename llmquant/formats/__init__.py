"""Foreign checkpoint formats: one module per format, each converting one linear layer's tensors
to and from llmquant's layout (docs/FORMAT.md) bit-exactly, and writing/reading the
`quantization_config` of config.json.

Every format module has the same functions (a module is the strategy, no class hierarchy):

- ``NAME``: the ``--format`` spelling; ``MEMBERS``: tensor suffixes of a quantized layer;
- ``check_layer(module, n, k, config)``: raise FormatError if the layer cannot be expressed;
- ``check_model(quantized, kept)``: raise FormatError if the split of the linears into quantized and
  float (full names) cannot be expressed;
- ``layer_specs(module, n, k, scale_dtype, config)``: the TensorSpecs ``export_layer`` writes;
- ``export_layer(module, packed, n, k, config)``: llmquant tensors -> this format's tensors;
- ``import_layer(module, tensors, n, k, config, source_qc)``: this format's tensors -> llmquant
  tensors (`source_qc`: the checkpoint's raw quantization_config);
- ``quantization_config(config, quantized=())`` / ``parse_config(quantization_config)``: ``quantized``
  lists the quantized linears' full names (GPTQ's ``modules_in_block_to_quantize`` needs them);
- ``engine_warnings(config)``: formats the file can hold but the engines' fast kernels cannot run;
- ``load_help(config)``: how engines load an export of that config (for the model card).

"llmquant tensors" (``packed``) are {"qweight": [ceil(K/V), N] int32, "scales": [G, N] float,
"qzeros": [G, N] uint8 (asymmetric only)}, as `llmquant.methods.codes.quantize_weight` returns them.
"""

from __future__ import annotations

from types import ModuleType

from ..errors import CheckpointError


class FormatError(CheckpointError):
    """A model that a format cannot express (one line naming the layer and the reason; exit 2)."""


def get_format(name: str) -> ModuleType:
    """The format module for a ``--format`` name or a ``quant_method``."""
    from . import compressed_tensors, gptq, llmquant

    formats = {module.NAME: module for module in (llmquant, gptq, compressed_tensors)}
    formats["compressed_tensors"] = compressed_tensors
    if name not in formats:
        raise FormatError(f"unknown format {name!r}; choose one of {sorted(set(formats) - {'compressed_tensors'})}")
    return formats[name]


FORMAT_NAMES = ("llmquant", "compressed-tensors", "gptq")


def detect_format(quantization_config: dict | None) -> str | None:
    """The format name of a config.json's quantization_config (None for a float model)."""
    if not quantization_config:
        return None
    method = quantization_config.get("quant_method")
    if method not in ("llmquant", "gptq", "compressed-tensors"):
        from ..checkpoint.verify import looks_like_llmquant

        hint = ""
        if looks_like_llmquant(quantization_config):
            hint = "; the other fields are llmquant's: set it to 'llmquant'"
        raise FormatError(
            f"quantization_config.quant_method is {method!r}, not one llmquant reads ({', '.join(FORMAT_NAMES)}){hint}"
        )
    return method
