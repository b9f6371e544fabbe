"""llmquant's own layout (docs/FORMAT.md): the identity conversion."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..checkpoint.shards import TensorSpec
from ..config import QuantConfig
from ..kernels.layout import STORED_NAMES, stored_tensors
from .registry import register_format

NAME = "llmquant"
MEMBERS = STORED_NAMES  # the identity: the stored format itself


@register_format(name=NAME, marker="qweight", scale_member="scales", members=MEMBERS)
def recognizes(quantization_config: dict) -> bool:
    return quantization_config.get("quant_method") == NAME


def looks_like(quantization_config: Any) -> bool:
    """A quantization_config dict with llmquant's own fields (whatever its quant_method says)."""
    return isinstance(quantization_config, dict) and {"bits", "group_size", "sym", "format_version"} <= set(
        quantization_config
    )

LOAD_HELP = """`pip install llmquant` first: without it, transformers skips the unknown quantization method with
a warning and leaves the quantized layers randomly initialised.

```python
import llmquant  # registers the "llmquant" quantization method with transformers
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER_OR_REPO")
```

Serving engines (vLLM, SGLang, TGI) do not read this layout; `llmquant convert THIS_FOLDER -o OUT
--format compressed-tensors` (or `gptq`) rewrites it for them without re-quantizing."""


def load_help(config: QuantConfig) -> str:
    """How engines load an export of `config` (the model card's "Load" section)."""
    return LOAD_HELP


def check_layer(module: str, n: int, k: int, config: QuantConfig) -> None:
    """Every QuantConfig is expressible in llmquant's own layout."""


def check_model(quantized: Sequence[str], kept: Sequence[str]) -> None:
    """modules_to_not_convert lists any set of float linears: nothing to refuse."""


def layer_specs(module: str, n: int, k: int, scale_dtype: torch.dtype, config: QuantConfig) -> list[TensorSpec]:
    stored = stored_tensors(n, k, config.bits, config.group_size, config.sym, scale_dtype)
    return [TensorSpec(f"{module}.{name}", dtype, shape) for name, dtype, shape in stored]


def export_layer(module: str, packed: dict[str, torch.Tensor], n: int, k: int, config: QuantConfig) -> dict:
    return {key: packed[key] for key in MEMBERS if key in packed}


def import_layer(
    module: str, tensors: dict[str, torch.Tensor], n: int, k: int, config: QuantConfig, source_qc: dict
) -> dict:
    return {key: tensors[key] for key in MEMBERS if key in tensors}


def quantization_config(config: QuantConfig, quantized: Sequence[str] = ()) -> dict:
    return config.to_dict()


def parse_config(quantization_config: dict) -> QuantConfig:
    return QuantConfig(**quantization_config)


def engine_warnings(config: QuantConfig) -> list[str]:
    return []
