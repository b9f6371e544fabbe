"""Run code right after a module is imported: how llmquant registers itself with transformers.

Two users, one mechanism:
- `llmquant-autoload.pth` (installed into site-packages by setup.py) calls `install()` at
  interpreter start, so `AutoModelForCausalLM.from_pretrained` loads llmquant checkpoints without
  `import llmquant`: once `transformers.modeling_utils` has executed, llmquant is imported. It
  must cost nothing: a process that never loads a transformers model never imports llmquant.
- `import llmquant` (which is lazy and does not import transformers) registers its quantizer as
  soon as `transformers.quantizers` exists, before or after llmquant itself was imported.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

TRIGGER = "transformers.modeling_utils"


class _AfterImport:
    """A meta path finder that finds nothing itself: it wraps the loader of one module so that
    `callback` runs once that module has executed, then removes itself."""

    def __init__(self, name: str, callback: Callable[[], None]) -> None:
        self.name, self.callback = name, callback

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN201 (importlib protocol)
        if name != self.name:
            return None
        sys.meta_path.remove(self)
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(name, path, target) if find_spec else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module, callback = spec.loader.exec_module, self.callback

        def exec_then_call(module):  # noqa: ANN001, ANN202
            exec_module(module)
            callback()

        spec.loader.exec_module = exec_then_call
        return spec


def after_import(name: str, callback: Callable[[], None]) -> None:
    """Call `callback` now if module `name` is imported, else right after it is (once)."""
    if name in sys.modules:
        callback()
    elif not any(isinstance(f, _AfterImport) and (f.name, f.callback) == (name, callback) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(name, callback))


def _import_llmquant() -> None:
    if "llmquant" in sys.modules:  # llmquant is imported: it registers itself
        return
    try:
        import llmquant  # noqa: F401  (its import registers the transformers integration)
    except Exception as error:  # a broken install must not break transformers for everyone
        import warnings

        warnings.warn(f"llmquant could not register with transformers: {error}", stacklevel=2)


def install() -> None:
    """Called by the .pth file at interpreter start."""
    after_import(TRIGGER, _import_llmquant)
