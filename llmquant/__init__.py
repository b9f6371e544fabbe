"""llmquant: group-wise int4/int8 weight-only quantization for Hugging Face models.

import llmquant
model = AutoModelForCausalLM.from_pretrained(path, quantization_config=llmquant.QuantConfig(bits=4))
"""

from .config import QuantConfig
from .convert import dequantize_, quantize_
from .formats.load import load
from .hf import register as _register
from .linear import QuantLinear
from .stats import bits_per_weight, model_size_bytes

_register()

__version__ = "0.1.0"
__all__ = ["QuantConfig", "QuantLinear", "bits_per_weight", "dequantize_", "load", "model_size_bytes", "quantize_"]
