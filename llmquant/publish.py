"""Staging an output folder and publishing it atomically: readers never see a half-written model,
and nothing but an earlier llmquant output is ever replaced.

The output is written into `.OUT.tmp-PID` beside OUT and renamed into place when complete. With
--overwrite, the old OUT is renamed to `.OUT.old-PID`, the new one renamed in, then the old one
deleted (restored if the rename fails). Staging folders left by killed runs are cleaned up by
the next run once their process is gone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .config import QUANT_METHOD
from .errors import CheckpointError
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


def is_llmquant_output(folder: Path) -> bool:
    """True for a folder an earlier run may replace: empty, or with a config.json whose
    quantization_config.quant_method is llmquant."""
    if not folder.is_dir() or folder.is_symlink():
        return False
    if not any(folder.iterdir()):
        return True
    try:
        config = json.loads((folder / "config.json").read_text())
        return config["quantization_config"]["quant_method"] == QUANT_METHOD
    except (OSError, ValueError, TypeError, KeyError):
        return False


def check_output(out: Path, source: Path, overwrite: bool) -> None:
    """Refuse an output that is the source, inside it or a parent of it, and an existing one
    unless --overwrite and it is an earlier llmquant output (or empty)."""
    out_real, source_real = out.resolve(), source.resolve()
    if out_real == source_real or source_real in out_real.parents or out_real in source_real.parents:
        raise CheckpointError(f"output {out} is the source folder, inside it or a parent of it; choose another")
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise CheckpointError(f"output {out} already exists; pass --overwrite to replace it")
    if not is_llmquant_output(out):
        raise CheckpointError(
            f"refusing to overwrite {out}: it is not an earlier llmquant output (no config.json with "
            f"quant_method {QUANT_METHOD!r}) nor an empty folder"
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale(out: Path) -> None:
    """Remove `.OUT.tmp-PID` / `.OUT.old-PID` folders of processes that no longer run. A stale
    `.old` with no OUT is a swap cut short: it is put back as OUT rather than deleted."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-(\d+)$")
    if not out.parent.is_dir():
        return
    for path in sorted(out.parent.iterdir()):
        match = pattern.match(path.name)
        if not match or _alive(int(match[2])) or not path.is_dir():
            continue
        if match[1] == "old" and not out.exists():
            path.rename(out)
        else:
            shutil.rmtree(path, ignore_errors=True)


@contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """Yield an empty staging folder beside `out`; on success it replaces `out` atomically, on
    any error (or interrupt) it is removed and `out` is left as it was."""
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
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
            try:
                staging.rename(out)
            except BaseException:
                trash.rename(out)
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in created:  # parents this run made, if still empty
            try:
                folder.rmdir()
            except OSError:
                break
        raise
