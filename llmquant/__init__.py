"""llmquant: group-wise int4/int8 weight-only quantization for Hugging Face models.

import llmquant
model = AutoModelForCausalLM.from_pretrained(path, quantization_config=llmquant.QuantConfig(bits=4))

`import llmquant` is cheap: torch and transformers load on first use of a public name, so the
`llmquant` command answers `--help` and argument errors without them. The transformers integration
(quant_method "llmquant") is registered as soon as transformers' quantizer registry is imported,
before or after `import llmquant`, so `from_pretrained(quantized_dir)` works after a bare import.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import _llmquant_autoload


def _unshadow_kernels() -> None:
    """Run from a source checkout's root (`python -m ...`, `-c`, pytest), the checkout's kernels/
    folder (installed as llmquant.kernels) would be found as the top-level `kernels` package, which
    transformers >= 5.25 imports from the Hub's `kernels` distribution ("cannot import name
    'CUDAProperties' from 'kernels'"). Bind the name to the installed one, loaded lazily so that
    `import llmquant` stays cheap."""
    from importlib.machinery import PathFinder
    from importlib.util import LazyLoader, find_spec, module_from_spec
    from pathlib import Path

    if "kernels" in sys.modules:
        return
    found, ours = find_spec("kernels"), find_spec("llmquant.kernels")
    if found is None or ours is None or found.origin is None or ours.origin is None:
        return
    if Path(found.origin).resolve() != Path(ours.origin).resolve():
        return  # the top-level name is not our folder (an installed copy, or no checkout on the path)
    root = Path(found.origin).resolve().parent.parent
    installed = PathFinder.find_spec("kernels", [p for p in sys.path if Path(p or ".").resolve() != root])
    if installed is None or installed.loader is None:
        return  # not installed (older transformers): then nothing imports it
    installed.loader = LazyLoader(installed.loader)
    module = module_from_spec(installed)
    sys.modules["kernels"] = module
    installed.loader.exec_module(module)


_unshadow_kernels()

__version__ = "0.1.0"  # the one place: pyproject.toml reads it (dynamic version), `llmquant --version` prints it
__all__ = [
    "CalibrationSet",
    "QuantConfig",
    "QuantLinear",
    "bits_per_weight",
    "dequantize_",
    "load",
    "load_calibration",
    "model_size_bytes",
    "quantize_",
]

# public name -> submodule defining it
_LAZY = {
    "CalibrationSet": "calibration.data",
    "load_calibration": "calibration.data",
    "QuantConfig": "config",
    "QuantLinear": "nn.linear",
    "bits_per_weight": "stats",
    "model_size_bytes": "stats",
    "dequantize_": "nn.surgery",
    "quantize_": "api",
    "load": "api",
}
_REGISTRY_MODULE = "transformers.quantizers"  # the package that re-exports register_quantizer


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("__"):
        try:  # submodules as attributes (llmquant.hf, llmquant.nn.linear, ...)
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


def _register() -> None:
    importing = sys.modules.get(f"{__name__}.hf")
    if importing is not None and not hasattr(importing, "register"):
        return  # llmquant.hf is being imported right now (it imported transformers); it registers at its end
    from .hf import register

    register()


# Registered as soon as transformers' quantizer registry exists, before or after this import.
_llmquant_autoload.after_import(_REGISTRY_MODULE, _register)
