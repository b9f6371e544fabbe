"""transformers integration: `from_pretrained` loads llmquant checkpoints and quantizes on load.

Registered under quant_method "llmquant" by `register()` (called on `import llmquant`; safe to
call twice). Pre-quantized load swaps nn.Linear for empty QuantLinear (and Mixture-of-Experts
experts modules for QuantExperts, llmquant/nn/experts.py) before the weights are read, so the packed
tensors load straight into their buffers. Quantize-on-load lets transformers
load the floating-point weights, then quantizes layer by layer after loading (as the GPTQ
integration does): simple and robust across transformers 5.x, at the price of holding the
floating-point model once.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)

from .checkpoint.verify import check_checkpoint, check_loaded, guard_unknown_quant_method
from .config import QUANT_METHOD, QuantConfig
from .nn.surgery import dequantize_, modules_to_skip, replace_with_empty_quant_linear, round_to_nearest_

logger = logging.getLogger(__name__)
CPU_COMPUTE_DTYPE = torch.float32  # measured fastest here (evals/bench_cpu.py); fp16/bf16 GEMMs are emulated


def _dtype_left_to_auto() -> bool:
    """True when the running `from_pretrained` call got no dtype (or dtype="auto").

    transformers resolves "auto" to the checkpoint's dtype before asking the quantizer
    (update_dtype), so the only place that still tells an explicit dtype from the default is the
    caller's frame. If it cannot be found, the dtype counts as explicit (left alone).
    """
    frame = sys._getframe(1)
    for _ in range(8):
        frame = frame.f_back
        if frame is None:
            return False
        if frame.f_code.co_name == "from_pretrained" and "dtype" in frame.f_locals:
            given = frame.f_locals["dtype"]
            return given == "auto" and frame.f_locals.get("torch_dtype") in (None, "auto")
    return False


def _on_cpu(device_map: Any) -> bool:
    if device_map is None:
        return True
    if isinstance(device_map, dict):
        return all(str(v) == "cpu" for v in device_map.values())
    return str(device_map) == "cpu"


def _skip_family_init_of_parents(model: Any, replaced: list[str]) -> None:
    """Mark the parents of swapped layers as initialised when they hold no tensor of their own.

    transformers runs each family's `_init_weights` on modules after loading, and some reach
    into their children's weights (GPT-2 re-initialises `c_proj.weight` of its attention and MLP
    modules, a Conv1D weight that is a QuantLinear's packed buffers now): with nothing of its own
    to initialise, the parent is skipped; its children are still visited one by one."""
    for name in replaced:
        parent = model.get_submodule(name.rpartition(".")[0])
        if not any(True for _ in parent.parameters(recurse=False)) and not any(
            True for _ in parent.buffers(recurse=False)
        ):
            parent._is_hf_initialized = True


class LlmquantHfQuantizer(HfQuantizer):
    """HfQuantizer for QuantConfig: pre-quantized loading and quantize-on-load."""

    requires_calibration = False
    quantization_config: QuantConfig

    def __init__(self, quantization_config: QuantConfig, **kwargs: Any) -> None:
        # A private copy: resolving modules_to_not_convert for this model must not edit the
        # caller's config, which may be reused for another model.
        super().__init__(QuantConfig(**quantization_config.to_dict()), **kwargs)

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        device_map = kwargs.get("device_map")
        self._device_map = device_map
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError(
                "llmquant cannot offload quantized layers to disk; use device_map='auto' with enough memory"
            )

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """On CPU with no explicit dtype: compute in float32, not the checkpoint's float16."""
        if dtype in (torch.float16, torch.bfloat16) and _on_cpu(getattr(self, "_device_map", None)):
            if _dtype_left_to_auto():
                logger.warning(
                    "llmquant: loading on CPU in float32 (the checkpoint's %s is ~2x slower on this CPU); "
                    "pass dtype=%s to keep it",
                    str(dtype).removeprefix("torch."),
                    dtype,
                )
                return CPU_COMPUTE_DTYPE
        return dtype

    def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> None:
        config = self.quantization_config
        if not self.pre_quantized:
            from .methods.presets import get_preset

            if get_preset(config.method).calibrated:
                raise ValueError(
                    f"method {config.method!r} needs calibration data, which from_pretrained cannot pass: load the "
                    "float model, then llmquant.quantize_(model, config, calibration=llmquant.load_calibration("
                    "tokenizer)), or run `llmquant quantize --method "
                    f"{config.method}`"
                )
        if config.modules_to_not_convert is None:
            config.modules_to_not_convert = modules_to_skip(model, config)
        if self.pre_quantized:
            dtype = kwargs.get("dtype") or model.config.dtype or torch.float16
            if isinstance(dtype, str):
                dtype = getattr(torch, dtype) if dtype != "auto" else torch.float16
            replaced = replace_with_empty_quant_linear(model, config, dtype)
            _skip_family_init_of_parents(model, replaced)
            check_checkpoint(model, config, kwargs.get("checkpoint_files"))
        model.config.quantization_config = config

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        if not self.pre_quantized:
            round_to_nearest_(model, self.quantization_config, progress=False)  # calibrated: refused above
        check_loaded(model, self.quantization_config)
        from .nn.linear import QuantLinear

        for module in model.modules():  # the CPU kernel's copy of the codes, made now, counted now
            if isinstance(module, QuantLinear) and module.qweight.device.type == "cpu":
                module.prepare_cpu()
        return model

    def _dequantize(self, model: Any, dtype: torch.dtype | None = None) -> Any:
        return dequantize_(model, dtype)

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


def register() -> None:
    """Register QuantConfig and the quantizer with transformers (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(QuantConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(LlmquantHfQuantizer)
    guard_unknown_quant_method()


# Importing this module is what makes transformers know "llmquant", whoever imports it first.
register()
