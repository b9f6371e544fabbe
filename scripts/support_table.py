"""Run the family matrix (tests/nn/test_families.py) and write its outcomes as the support table.

    .venv/bin/python scripts/support_table.py

Writes evals/results/families-support.json (each cell's outcome as the tests recorded it, with
versions, commit and date) and replaces the table between the support-table markers in
docs/METHODS.md. Nothing in the table is written by hand: a cell says "works" only when its test
got that far (CLI quantize, every linear quantized, from_pretrained logits equal to the in-memory
quantize_, export read back with llmquant.load).
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "evals" / "results" / "families-support.json"
DOC = ROOT / "docs" / "METHODS.md"
BEGIN, END = "<!-- support-table:begin -->", "<!-- support-table:end -->"
METHODS = ("rtn", "gptq", "gptq-rot")
FORMATS = ("llmquant", "gptq", "compressed-tensors")


def run_matrix() -> tuple[dict, int]:
    """{family: {method: {column: outcome}}} recorded by the tests, and pytest's exit code."""
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "table.json"
        env = {**os.environ, "LLMQUANT_SUPPORT_TABLE": str(path), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        # -P / importlib: the project's kernels/ folder must not shadow the `kernels` package transformers imports
        command = [sys.executable, "-P", "-m", "pytest", "--import-mode=importlib", "-q", "tests/nn/test_families.py"]
        code = subprocess.run(command, cwd=ROOT, env=env).returncode
        return (json.loads(path.read_text()) if path.exists() else {}), code


def cell(outcomes: dict | None) -> str:
    """One table cell: the formats that work, a refusal's reason, or "fails"."""
    if not outcomes:
        return "fails"
    quantize = outcomes.get("quantize", "")
    if quantize.startswith("refused"):
        return quantize.replace("|", "/")
    works = [fmt for fmt in FORMATS if outcomes.get(fmt) == "works"]
    return "works: " + ", ".join(works) if works else "quantizes; load fails"


def markdown(table: dict, families: list[str]) -> str:
    lines = ["| family | " + " | ".join(METHODS) + " |", "| --- |" + " --- |" * len(METHODS)]
    for family in families:
        lines.append(f"| {family} | " + " | ".join(cell(table.get(family, {}).get(m)) for m in METHODS) + " |")
    return "\n".join(lines)


def main() -> int:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_families import FAMILIES  # the family list is the tests' data

    table, code = run_matrix()
    families = [f.name for f in FAMILIES]
    import torch
    import transformers

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    RESULT.write_text(
        json.dumps(
            {
                "command": "python scripts/support_table.py",
                "pytest_exit_code": code,
                "commit": commit.stdout.strip(),
                "date": datetime.date.today().isoformat(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "cells": table,
            },
            indent=1,
            sort_keys=True,
        )
        + "\n"
    )
    text = DOC.read_text()
    begin, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    DOC.write_text(text[:begin] + "\n" + markdown(table, families) + "\n" + text[end:])
    print(markdown(table, families))
    return code


if __name__ == "__main__":
    sys.exit(main())
