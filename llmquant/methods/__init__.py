"""Quantization methods: how codes, scales and zeros are chosen. One module per method.

Every method returns a `QuantizedWeight` in the same stored layout (docs/FORMAT.md), so kernels
and loaders never depend on the method. Calibrated methods receive H = 2 X^T X / n of the layer's
inputs (see `llmquant.calibrate`); calibration-free ones receive None.

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

Adding a method: one new module with a `quantize(weight, hessian, bits, group_size, sym,
scale_dtype, name)` function and one `Method` line below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import awq, clip, gptaq, gptq, rtn


@dataclass(frozen=True)
class Method:
    """A registered method: its function and whether it needs calibration activations."""

    name: str
    quantize: Callable
    calibrated: bool
    summary: str
    scaling: bool = False  # AWQ-style channel scaling folded into norms / preceding linears first
    float_target: bool = False  # receives W* toward the float model's layer outputs (methods/gptaq.py)
    rotation: bool = False  # residual stream and attention heads rotated first (methods/rotation.py)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("rtn", rtn.quantize, False, "round to nearest"),
        Method("clip", clip.quantize, True, "round to nearest, clipping search on calibration activations"),
        Method("gptq", gptq.quantize, True, "GPTQ error feedback + clipping search"),
        Method("gptq-noclip", gptq.quantize_noclip, True, "GPTQ error feedback without clipping search"),
        Method("awq", awq.quantize, True, "activation-aware channel scaling, then clip", scaling=True),
        Method("gptq-awq", awq.quantize_gptq, True, "activation-aware channel scaling, then gptq", scaling=True),
        Method(
            "gptaq", gptaq.quantize, True, "gptq toward the float model's layer outputs (slower)", float_target=True
        ),
        Method("gptq-rot", gptq.quantize, True, "rotations folded into the weights, then gptq (best)", rotation=True),
    )
}


def get_method(name: str) -> Method:
    """The registered method called `name`; ValueError listing the choices otherwise."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"method must be one of {list(METHODS)}, got {name!r}") from None
