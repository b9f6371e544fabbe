"""llmquant: group-wise int4/int8 weight-only quantization for Hugging Face models.

import llmquant
model = AutoModelForCausalLM.from_pretrained(path, quantization_config=llmquant.QuantConfig(bits=4))
"""

from .calibration import CalibrationSet, load_calibration
from .config import QuantConfig
from .convert import dequantize_, quantize_
from .hf import register as _register
from .linear import QuantLinear
from .stats import bits_per_weight, model_size_bytes

_register()

__version__ = "0.1.0"
__all__ = [
    "CalibrationSet",
    "QuantConfig",
    "QuantLinear",
    "bits_per_weight",
    "dequantize_",
    "load_calibration",
    "model_size_bytes",
    "quantize_",
]
