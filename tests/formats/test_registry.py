"""The format registry: each format declares itself once, in its own module, and everything that
needs a format (the CLI's choices, convert, the model card, `llmquant.load`) asks the registry."""

import ast
from pathlib import Path

import pytest

import llmquant.formats
from llmquant.errors import FormatError
from llmquant.formats import detect_format, format_names, get_format
from llmquant.formats.registry import load_formats

FORMATS_DIR = Path(llmquant.formats.__file__).parent


def test_names_read_off_the_files_are_the_registered_formats():
    formats = load_formats()
    assert format_names() == tuple(formats) == ("llmquant", "compressed-tensors", "gptq")
    for name, module in formats.items():
        assert module.NAME == name and get_format(name) is module
        assert module.MARKER in module.MEMBERS and module.SCALE_MEMBER in module.MEMBERS
        assert module.recognizes({"quant_method": name})
        assert detect_format({"quant_method": name}) == name
    assert get_format("compressed_tensors") is formats["compressed-tensors"]
    assert detect_format(None) is None and detect_format({}) is None


def test_unknown_formats_are_refused_with_the_names_llmquant_reads():
    with pytest.raises(FormatError, match=r"unknown format 'awq'; choose one of \['compressed-tensors', 'gptq'"):
        get_format("awq")
    with pytest.raises(FormatError, match=r"'awq', not one llmquant reads \(llmquant, compressed-tensors, gptq\)$"):
        detect_format({"quant_method": "awq"})
    llmquant_fields = {"quant_method": "llmquant4", "bits": 4, "group_size": 128, "sym": True, "format_version": 1}
    with pytest.raises(FormatError, match="the other fields are llmquant's: set it to 'llmquant'"):
        detect_format(llmquant_fields)


def test_the_cli_lists_the_registered_formats():
    from llmquant.cli import build_parser

    parser = build_parser()
    for command in ("quantize", "convert"):
        action = next(
            a
            for sub in parser._subparsers._group_actions
            for a in sub.choices[command]._actions
            if "--format" in a.option_strings
        )
        assert tuple(action.choices) == format_names()


def _imports(path: Path) -> set[str]:
    """The modules of llmquant.formats that `path` imports (relative imports inside the package)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.add(node.module or "__init__")
            if node.module is None:
                found.update(alias.name for alias in node.names)
    return found


def test_no_module_of_the_formats_package_imports_the_package_back():
    """`__init__` imports the registry only; the format modules import the registry and their
    helpers, never `__init__` (the cycle there was FormatError living in `__init__`)."""
    graph = {path.stem: _imports(path) for path in FORMATS_DIR.glob("*.py")}
    assert graph["__init__"] == {"registry"}
    for module, imported in graph.items():
        assert "__init__" not in imported, module
    seen, stack = set(), []

    def visit(module: str) -> None:
        assert module not in stack, f"import cycle: {' -> '.join([*stack, module])}"
        if module in seen:
            return
        stack.append(module)
        for target in graph.get(module, ()):
            visit(target)
        stack.pop()
        seen.add(module)

    for module in graph:
        visit(module)
