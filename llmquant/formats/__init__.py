"""Foreign checkpoint formats: one module per format, each converting one linear layer's tensors
to and from llmquant's layout (docs/FORMAT.md) bit-exactly, and writing/reading the
`quantization_config` of config.json.

Each format module registers itself (`registry.register_format`) and provides the functions of
`registry.Format`; `experts.py` applies a format to Mixture-of-Experts tensors and `common.py`
holds the checks and packing helpers the GPTQ and compressed-tensors modules share.
"""

from __future__ import annotations

from .registry import Format, detect_format, format_names, get_format, register_format

__all__ = ["Format", "detect_format", "format_names", "get_format", "register_format"]
