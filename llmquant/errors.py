"""Every error class of llmquant, and how a bad-input error is shown: one line, never a traceback."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A problem with the user's input, reported as one line (the CLI exits with code 2)."""


class FormatError(CheckpointError):
    """A model that a format cannot express (one line naming the layer and the reason; exit 2)."""


class QuantizedCheckpointError(ValueError):
    """The checkpoint's tensors do not match its quantization_config."""


class CalibrationError(ValueError):
    """Unusable calibration data (the CLI prints it as one line and exits with code 2)."""


class EvalError(ValueError):
    """Bad input to the harness (dataset, model folder, tokenizer, config): one line, CLI exit code 2."""


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name if the message is empty)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]


def with_cause(error: BaseException, limit: int = 300) -> str:
    """'Type: first line' of an exception, followed by its first cause when there is one (wrappers
    such as datasets' "An error occurred while generating the dataset" hide the real problem)."""
    text = f"{type(error).__name__}: {first_line(error, limit)}"
    cause = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    if cause is not None:
        text += f" (caused by {type(cause).__name__}: {first_line(cause, limit)})"
    return text


# Modules imported only by optional features -> the pip command that brings them; any other module
# (a core dependency missing from a broken environment) is named by its PyPI name.
INSTALL_HINTS = {
    "matplotlib": 'pip install "llmquant[plots]"',
    "triton": 'pip install "llmquant[kernels]"',
}


def install_hint(module: str) -> str:
    """The `pip install ...` that brings top-level module `module` (e.g. compressed_tensors -> compressed-tensors)."""
    return INSTALL_HINTS.get(module, f"pip install {module.replace('_', '-')}")


def missing_module(module: str, needed_for: str | None = None) -> str | None:
    """None when `module` can be imported, else one line naming the pip install that fixes it."""
    import importlib.util

    if importlib.util.find_spec(module) is not None:
        return None
    return f"{needed_for + ' needs ' if needed_for else ''}{module}, which is not installed: {install_hint(module)}"
