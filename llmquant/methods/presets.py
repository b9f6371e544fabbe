"""The registry of methods: each name is a preset, transforms applied to each block in order,
then one weight quantizer. Plain data (no torch): the CLI lists and validates names from it.

A quantizer is a function quantize(weight [N, K], hessian [K, K] | None, bits, group_size, sym,
scale_dtype, name) -> QuantizedWeight; a transform is a `methods.transform.Transform` whose hooks
the calibration loop calls. Both are named here as "module:attribute" of `llmquant.methods` and
imported only when a model is quantized (`methods.compose.resolve`).
"""

from __future__ import annotations

from dataclasses import dataclass

QUANTIZERS = {
    "rtn": "rtn:quantize",
    "clip": "clip:quantize",
    "gptq": "gptq:quantize",
    "gptq-noclip": "gptq:quantize_noclip",
}
TRANSFORMS = {
    "awq": "awq:ChannelScaling",  # activation-aware channel scaling folded into norms / preceding linears
    "float-target": "gptaq:FloatTarget",  # quantize toward the float model's layer outputs
    "rotation": "rotation:Rotation",  # residual stream and attention heads rotated (head untied)
}


@dataclass(frozen=True)
class Preset:
    """A registered method: transforms (names of TRANSFORMS, applied in order) and a quantizer."""

    name: str
    quantizer: str
    transforms: tuple[str, ...]
    summary: str

    @property
    def calibrated(self) -> bool:
        """Whether it needs calibration activations (every method but plain round to nearest)."""
        return self.quantizer != "rtn" or bool(self.transforms)

    @property
    def rotation(self) -> bool:
        """Whether it rotates the residual stream (changes embedding and head, unties a tied head)."""
        return "rotation" in self.transforms


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("rtn", "rtn", (), "round to nearest"),
        Preset("clip", "clip", (), "round to nearest, clipping search on calibration activations"),
        Preset("gptq", "gptq", (), "GPTQ error feedback + clipping search"),
        Preset("gptq-noclip", "gptq-noclip", (), "GPTQ error feedback without clipping search"),
        Preset("awq", "clip", ("awq",), "activation-aware channel scaling, then clip"),
        Preset("gptq-awq", "gptq", ("awq",), "activation-aware channel scaling, then gptq"),
        Preset("gptaq", "gptq", ("float-target",), "gptq toward the float model's layer outputs (slower)"),
        Preset("gptq-rot", "gptq", ("rotation",), "rotations folded into the weights, then gptq (best)"),
    )
}
METHOD_NAMES = tuple(PRESETS)


def get_preset(name: str) -> Preset:
    """The registered method called `name`; ValueError listing the choices otherwise."""
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise ValueError(f"method must be one of {list(PRESETS)}, got {name!r}") from None
