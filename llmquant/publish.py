"""Staging an output folder and publishing it atomically: readers never see a half-written model."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .source import WEIGHT_INDEXES, WEIGHT_SUFFIXES


def copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer, generation config, chat template...: every top-level file but weights,
    weight indexes, config.json (rewritten) and README.md (replaced by the model card)."""
    for path in src.iterdir():
        if (
            path.is_file()
            and path.suffix not in WEIGHT_SUFFIXES
            and path.name not in (*WEIGHT_INDEXES, "config.json", "README.md")
            and not path.name.startswith(".")
        ):
            shutil.copyfile(path, dst / path.name)


@contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """Yield an empty staging folder beside `out`; on success it replaces `out`, on any error
    (or interrupt) it is removed and `out` is left as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        for path in staging.iterdir():
            path.chmod(0o644)  # safetensors writes owner-only files; a published folder is readable
        staging.chmod(0o755)
        if out.exists():
            trash = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(trash)
            staging.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
