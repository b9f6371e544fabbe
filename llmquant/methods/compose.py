"""A preset's parts as objects: its quantizer function and fresh instances of its transforms."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from .presets import QUANTIZERS, TRANSFORMS, get_preset
from .transform import Transform


@dataclass(frozen=True)
class Recipe:
    """What the calibration loop runs for one method: transforms' hooks, then `quantize`."""

    name: str
    quantize: Callable
    transforms: tuple[Transform, ...]


def _attribute(reference: str) -> object:
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(f".{module}", __package__), attribute)


def resolve(method: str) -> Recipe:
    """The quantizer and new transform objects (they hold one run's state) of preset `method`."""
    preset = get_preset(method)
    transforms = tuple(_attribute(TRANSFORMS[name])() for name in preset.transforms)
    return Recipe(preset.name, _attribute(QUANTIZERS[preset.quantizer]), transforms)
