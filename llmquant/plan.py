"""Planning a quantized checkpoint: which source tensors are quantized, and what the output holds."""

from __future__ import annotations

from pathlib import Path

import torch

from .config import QuantConfig
from .convert import linear_layers, modules_to_skip
from .errors import CheckpointError
from .shards import TensorSpec


def quantizable_weights(src: Path, config: QuantConfig) -> tuple[dict[str, str], list[str]]:
    """{checkpoint tensor name of a Linear weight: module name} from a meta skeleton of the
    model, and the resolved modules_to_not_convert."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        model_config = AutoConfig.from_pretrained(src)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config)
    except Exception as error:
        raise CheckpointError(f"cannot build the model described by {src / 'config.json'}: {error}") from None
    layers = linear_layers(model, config)
    return {f"{name}.weight": name for name, _ in layers}, modules_to_skip(model, config)


def output_specs(
    source: list[TensorSpec], targets: dict[str, str], config: QuantConfig, fmt: str = "llmquant"
) -> list[TensorSpec]:
    """What the quantized checkpoint holds: each target weight becomes the tensors of format
    `fmt` (llmquant: qweight, scales in the weight's dtype and, asymmetric, qzeros); every other
    tensor is copied. A layer the format cannot express is refused here, before writing."""
    from .formats import get_format

    layout = get_format(fmt)
    specs = []
    for spec in source:
        if spec.name not in targets:
            specs.append(spec)
            continue
        if len(spec.shape) != 2 or not spec.dtype.is_floating_point:
            raise CheckpointError(f"tensor {spec.name!r} is {spec.dtype} {spec.shape}, not a 2-D float linear weight")
        n, k = spec.shape
        layout.check_layer(targets[spec.name], n, k, config)
        specs += layout.layer_specs(targets[spec.name], n, k, spec.dtype, config)
    return specs
