"""Quantization methods: how codes, scales and zeros are chosen.

A method is a preset (`presets.py`, plain data): transforms of each decoder block (`awq.py`
channel scaling, `rotation.py` rotations, `gptaq.py` float target), then a weight quantizer
(`rtn.py`, `clip.py`, `gptq.py`). Every quantizer returns a `QuantizedWeight` in the same stored
layout (docs/FORMAT.md), so kernels and loaders never depend on the method. Calibrated methods
receive H = 2 X^T X / n of the layer's inputs (`llmquant.calibration`); calibration-free ones None.

| name | calibration | what it does |
| --- | --- | --- |
| rtn | no | round to nearest (default) |
| clip | yes | round to nearest with a per-group range shrink minimising the output error |
| gptq | yes | GPTQ error feedback, contiguous-group act-order, clipping search per group |
| gptq-noclip | yes | GPTQ without the clipping search |
| awq | yes | activation-aware channel scaling folded into norms and preceding linears, then clip |
| gptq-awq | yes | activation-aware channel scaling, then gptq |
| gptaq | yes | gptq toward the float model's layer outputs (closest to float in KL; slower) |
| gptq-rot | yes | random orthogonal rotations folded into the weights (head untied), then gptq (best) |

This package imports no torch: adding a method is docs/METHODS.md, "Adding a method".
"""

from __future__ import annotations

from .presets import METHOD_NAMES, PRESETS, Preset, get_preset

# the registry under its earlier names
METHODS = PRESETS
get_method = get_preset

__all__ = ["METHODS", "METHOD_NAMES", "PRESETS", "Preset", "get_method", "get_preset"]
