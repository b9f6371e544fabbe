"""Make `AutoModelForCausalLM.from_pretrained` load llmquant checkpoints without `import llmquant`.

Imported at interpreter start by llmquant-autoload.pth (installed into site-packages by setup.py), so
it must cost nothing: it only puts a finder on sys.meta_path that waits for
`transformers.modeling_utils` (imported by anything that builds a transformers model). When that
module has finished executing, llmquant is imported, which registers its quantization config and
quantizer with transformers. A process that never loads a transformers model never imports llmquant.
"""

from __future__ import annotations

import sys

TRIGGER = "transformers.modeling_utils"


class _Finder:
    """A meta path finder that only wraps the loader of TRIGGER; it finds nothing itself."""

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001 (importlib protocol)
        if name != TRIGGER:
            return None
        uninstall()
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(name, path, target) if find_spec else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):  # noqa: ANN001, ANN202
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_then_register
        return spec


_FINDER = _Finder()


def _register() -> None:
    if "llmquant" in sys.modules:  # llmquant is importing (or imported): it registers itself
        return
    try:
        import llmquant  # noqa: F401  (its import registers the transformers integration)
    except Exception as error:  # a broken install must not break transformers for everyone
        import warnings

        warnings.warn(f"llmquant could not register with transformers: {error}", stacklevel=2)


def install() -> None:
    """Called by the .pth file at interpreter start."""
    if "transformers.modeling_utils" in sys.modules:
        _register()
    elif _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def uninstall() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
