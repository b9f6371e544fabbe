"""The export formats by name: each format module registers itself once with `register_format`.

A format is a module (the strategy; no class hierarchy) that declares, in its own file, what the
rest of llmquant asks about it, by decorating its `recognizes(quantization_config)` function:

    NAME = "gptq"
    MEMBERS = ("qweight", "qzeros", "scales", "g_idx")

    @register_format(name=NAME, marker="qweight", scale_member="scales", members=MEMBERS)
    def recognizes(quantization_config: dict) -> bool:
        return quantization_config.get("quant_method") == NAME

and defines the functions of `Format` below. Adding an export format is one new module in this
package, named as its format (`compressed_tensors.py` is "compressed-tensors"): `load_formats`
imports every module here and the decorator does the rest; `format_names` reads the names off the
file names, so the CLI lists them without importing torch.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import FormatError

if TYPE_CHECKING:
    import torch

    from ..checkpoint.shards import TensorSpec
    from ..config import QuantConfig


class Format(Protocol):
    """What a format module provides. "llmquant tensors" (``packed``) are {"qweight": [ceil(K/V), N]
    int32, "scales": [G, N] float, "qzeros": [G, N] uint8 (asymmetric only)}, as
    `llmquant.methods.codes.quantize_weight` returns them."""

    NAME: str  # the --format spelling and quantization_config.quant_method
    MARKER: str  # the tensor suffix that marks a quantized linear in a checkpoint of this format
    SCALE_MEMBER: str  # the tensor suffix holding the scales (its dtype is the checkpoint's float dtype)
    MEMBERS: tuple[str, ...]  # every tensor suffix of a quantized linear

    def recognizes(self, quantization_config: dict) -> bool:
        """Whether a config.json's quantization_config is this format's."""

    def check_layer(self, module: str, n: int, k: int, config: QuantConfig) -> None:
        """Raise FormatError if the layer [n, k] cannot be expressed."""

    def check_model(self, quantized: Sequence[str], kept: Sequence[str]) -> None:
        """Raise FormatError if the split of the linears (full names) into quantized and float cannot
        be expressed."""

    def layer_specs(
        self, module: str, n: int, k: int, scale_dtype: torch.dtype, config: QuantConfig
    ) -> list[TensorSpec]:
        """The TensorSpecs `export_layer` writes."""

    def export_layer(self, module: str, packed: dict, n: int, k: int, config: QuantConfig) -> dict:
        """llmquant tensors -> this format's tensors, {suffix: tensor}."""

    def import_layer(
        self, module: str, tensors: dict, n: int, k: int, config: QuantConfig, source_qc: dict
    ) -> dict:
        """This format's tensors -> llmquant tensors (`source_qc`: the checkpoint's quantization_config)."""

    def quantization_config(self, config: QuantConfig, quantized: Sequence[str] = ()) -> dict:
        """config.json's quantization_config; `quantized` lists the quantized linears' full names."""

    def parse_config(self, quantization_config: dict) -> QuantConfig:
        """The QuantConfig of a checkpoint's quantization_config (FormatError for what llmquant cannot hold)."""

    def engine_warnings(self, config: QuantConfig) -> list[str]:
        """What the file can hold but the engines' fast kernels cannot run."""

    def load_help(self, config: QuantConfig) -> str:
        """How engines load an export of `config` (the model card's "Load" section)."""


FORMATS: dict[str, Any] = {}  # name -> format module, in registration order
ALIASES: dict[str, str] = {}  # another spelling (e.g. a quant_method with "_") -> name
HELPERS = ("registry", "common", "experts")  # modules of this package that are not formats


def register_format(
    name: str, marker: str, scale_member: str, members: Sequence[str], aliases: Sequence[str] = ()
) -> Callable[[Callable[[dict], bool]], Callable[[dict], bool]]:
    """Decorate a format module's `recognizes(quantization_config)`: registers its module under
    `name` (and `aliases`) and sets the module's MARKER and SCALE_MEMBER (NAME and MEMBERS too, for
    a module that does not define them)."""

    def register(recognizes: Callable[[dict], bool]) -> Callable[[dict], bool]:
        module = sys.modules[recognizes.__module__]
        if _name_of(recognizes.__module__.rpartition(".")[2]) != name:
            raise ValueError(f"format {name!r} must be defined in {name.replace('-', '_')}.py (format_names reads it)")
        module.NAME, module.MARKER, module.SCALE_MEMBER = name, marker, scale_member
        module.MEMBERS = tuple(members)
        FORMATS[name] = module
        ALIASES.update(dict.fromkeys(aliases, name))
        return recognizes

    return register


def _name_of(module: str) -> str:
    return module.replace("_", "-")


@functools.cache
def _format_modules() -> tuple[str, ...]:
    """The format modules of this package (every module but the helpers): llmquant's own first,
    then the others by name (the order of the CLI's choices and of messages). Listed once."""
    names = [info.name for info in pkgutil.iter_modules([str(Path(__file__).parent)]) if info.name not in HELPERS]
    return tuple(sorted(names, key=lambda name: (name != "llmquant", name)))


def format_names() -> tuple[str, ...]:
    """The --format spellings, read off the format modules' file names (nothing imported: no torch)."""
    return tuple(_name_of(module) for module in _format_modules())


def load_formats() -> dict[str, Format]:
    """{name: format module} of every format of this package, imported once (each registers itself
    on import), in `format_names` order."""
    package = __name__.rpartition(".")[0]
    for module in _format_modules():
        importlib.import_module(f"{package}.{module}")
    return {name: FORMATS[name] for name in format_names()}


def get_format(name: str) -> ModuleType:
    """The format module for a ``--format`` name or a ``quant_method``."""
    formats = load_formats()
    module = formats.get(ALIASES.get(name, name))
    if module is None:
        raise FormatError(f"unknown format {name!r}; choose one of {sorted(formats)}")
    return module


def detect_format(quantization_config: dict | None) -> str | None:
    """The format name of a config.json's quantization_config (None for a float model); FormatError
    naming the quant_method when no format recognizes it."""
    if not quantization_config:
        return None
    formats = load_formats()
    for name, module in formats.items():
        if module.recognizes(quantization_config):
            return name
    method = quantization_config.get("quant_method")
    hint = ""
    for name, module in formats.items():
        looks_like = getattr(module, "looks_like", None)
        if looks_like is not None and looks_like(quantization_config):
            hint = f"; the other fields are {name}'s: set it to {name!r}"
    raise FormatError(
        f"quantization_config.quant_method is {method!r}, not one llmquant reads ({', '.join(formats)}){hint}"
    )
