"""`QuantConfig`: what to quantize and how. It is also the transformers quantization config."""

from __future__ import annotations

import re
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

# SUPPORTED_BITS and SUPPORTED_GROUP_SIZES stay importable from here, as before layout owned them
from .kernels.layout import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, check_bits, check_group_size  # noqa: F401
from .methods.presets import METHOD_NAMES, get_preset

QUANT_METHOD = "llmquant"
FORMAT_VERSION = 1
SUPPORTED_METHODS = METHOD_NAMES
# Short config names: intB-gG[-sym|-asym][-METHOD], e.g. int4-g128, int4-g128-sym-gptq.
SHORT_NAME = re.compile(
    r"^int(?P<bits>\d+)-g(?P<group>\d+|all|-1)(?P<sym>-sym|-asym)?(?:-(?P<method>[a-z][a-z0-9-]*))?$"
)


class QuantConfig(QuantizationConfigMixin):
    """Group-wise weight-only quantization of the linear layers of a model.

    Args:
        bits: code width, one of 2, 3, 4, 8.
        group_size: consecutive input columns sharing a scale (and zero): 32, 64, 128, 256,
            or -1 for one group per output row. A last, shorter group is allowed.
        sym: symmetric codes around an implicit zero (no stored zeros) instead of asymmetric.
        method: how codes are chosen (`llmquant.methods.presets.PRESETS`): "rtn" (round to nearest,
            default), "clip", "gptq" (needs calibration data, see `llmquant.quantize_`),
            "gptq-noclip", "awq", "gptq-awq", "gptaq", "gptq-rot" (best quality: rotations folded
            into the weights, then gptq; a tied head becomes its own float tensor). The stored
            form never depends on it, so every method loads with the same kernels.
        modules_to_not_convert: module names (or name suffixes) left in floating point. None
            means the output head; embeddings are never quantized (they are not nn.Linear; gptq-rot
            rotates them).
    """

    def __init__(
        self,
        bits: int = 4,
        group_size: int = 128,
        sym: bool = False,
        method: str = "rtn",
        modules_to_not_convert: list[str] | None = None,
        format_version: int = FORMAT_VERSION,
        calibration: dict | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("quant_method", None)
        if kwargs:
            raise ValueError(f"QuantConfig got unknown fields {sorted(kwargs)}")
        self.quant_method = QUANT_METHOD
        self.bits = bits
        self.group_size = group_size
        self.sym = sym
        self.method = method
        if isinstance(modules_to_not_convert, tuple):
            modules_to_not_convert = list(modules_to_not_convert)
        self.modules_to_not_convert = modules_to_not_convert
        self.format_version = format_version
        self.calibration = calibration  # what calibrated methods used (recorded, not an input)
        self.post_init()

    def post_init(self) -> None:
        """Validate every field; raise ValueError naming the field and the allowed values."""
        check_bits(self.bits)
        check_group_size(self.group_size)
        if not isinstance(self.sym, bool):
            raise ValueError(f"sym must be True or False, got {self.sym!r}")
        get_preset(self.method)  # ValueError listing the registered methods
        skip = self.modules_to_not_convert
        if skip is not None and not (isinstance(skip, list) and all(isinstance(n, str) and n for n in skip)):
            raise ValueError(f"modules_to_not_convert must be a list of module names, got {skip!r}")
        if self.format_version != FORMAT_VERSION:
            raise ValueError(
                f"format_version must be {FORMAT_VERSION} (this llmquant's layout), got {self.format_version!r}"
            )

    def short_name(self) -> str:
        """e.g. 'int4-g128' or 'int8-gall-sym', the spelling `llmquant eval --configs` accepts."""
        group = "all" if self.group_size == -1 else str(self.group_size)
        method = "" if self.method == "rtn" else f"-{self.method}"
        return f"int{self.bits}-g{group}" + ("-sym" if self.sym else "") + method

    @classmethod
    def from_short_name(cls, text: str) -> QuantConfig:
        """'int4-g128-sym-gptq' -> QuantConfig (method rtn when left out); ValueError if malformed."""
        match = SHORT_NAME.match(text.strip())
        if not match:
            raise ValueError(f"cannot parse config name {text!r}: expected intB-gG[-sym][-METHOD], e.g. int4-g128-gptq")
        group = -1 if match["group"] in ("all", "-1") else int(match["group"])
        return cls(
            bits=int(match["bits"]), group_size=group, sym=match["sym"] == "-sym", method=match["method"] or "rtn"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": self.quant_method,
            "bits": self.bits,
            "group_size": self.group_size,
            "sym": self.sym,
            "method": self.method,
            "modules_to_not_convert": self.modules_to_not_convert,
            "format_version": self.format_version,
        } | ({"calibration": self.calibration} if self.calibration is not None else {})

    def __eq__(self, other: object) -> bool:
        return isinstance(other, QuantConfig) and self.to_dict() == other.to_dict()
