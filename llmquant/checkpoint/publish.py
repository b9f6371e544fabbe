"""Staging an output folder and publishing it atomically: readers never see a half-written model,
and nothing but an earlier llmquant output is ever replaced.

The output is written into `.OUT.tmp-PID-TAG` beside OUT and renamed into place when complete.
Publishing is exclusive: the final step runs under an exclusive lock on OUT's parent folder
(`flock`, held for a few renames) and looks at OUT again there, so a folder that appeared while
the run was writing (another run finished first, a user made it) is never replaced without
--overwrite, and two runs with --overwrite swap in one after the other, each complete. The new
folder is renamed in with RENAME_NOREPLACE where the system has it, so even a writer that takes
no lock cannot be overwritten. With --overwrite, the old OUT is renamed to `.OUT.old-PID-TAG`,
the new one renamed in, then the old one deleted (restored if the rename fails). Staging folders
left by killed runs are cleaned up by the next run once their process is gone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..config import QUANT_METHOD
from ..errors import CheckpointError
from .source import WEIGHT_INDEXES, WEIGHT_SUFFIXES, check_inside, read_model_config


def side_files(src: Path) -> list[Path]:
    """Tokenizer, generation config, chat template...: every top-level file but weights,
    weight indexes, config.json (rewritten) and README.md (replaced by the model card).
    A link resolving outside `src` is refused naming it (`source.check_inside` says why);
    called before any work, so a run never fails on it after minutes of quantizing."""
    files = []
    for path in sorted(src.iterdir()):
        if (
            path.is_file()
            and path.suffix not in WEIGHT_SUFFIXES
            and path.name not in (*WEIGHT_INDEXES, "config.json", "README.md")
            and not path.name.startswith(".")
        ):
            check_inside(path, src)
            files.append(path)
    return files


def copy_side_files(src: Path, dst: Path) -> None:
    """Copy `side_files(src)` into `dst` (as regular files, checked again at copy time)."""
    for path in side_files(src):
        shutil.copyfile(path, dst / path.name)


def written_by_llmquant(quantization_config: object) -> bool:
    """True for a quantization_config that llmquant wrote, in any of its formats: quant_method
    llmquant, or a GPTQ / compressed-tensors config carrying llmquant's producer mark
    (`meta.quantizer` / `provenance.producer`, llmquant/formats/)."""
    if not isinstance(quantization_config, dict):
        return False
    method = quantization_config.get("quant_method")
    if method == QUANT_METHOD:
        return True
    if method == "gptq":
        quantizers = (quantization_config.get("meta") or {}).get("quantizer") or []
        return isinstance(quantizers, list) and any(str(q).startswith(f"{QUANT_METHOD}:") for q in quantizers)
    if method == "compressed-tensors":
        producer = (quantization_config.get("provenance") or {}).get("producer")
        return isinstance(producer, str) and producer.startswith(f"{QUANT_METHOD} ")
    return False


def is_llmquant_output(folder: Path) -> bool:
    """True for a folder an earlier run may replace: empty, or with a config.json whose
    quantization_config llmquant wrote (any format it writes)."""
    if not folder.is_dir() or folder.is_symlink():
        return False
    if not any(folder.iterdir()):
        return True
    try:
        config = read_model_config(folder, links=True)
        return written_by_llmquant(config["quantization_config"])
    except (OSError, ValueError, TypeError, KeyError):
        return False


def check_output(out: Path, source: Path, overwrite: bool) -> None:
    """Refuse an output that is the source, inside it or a parent of it, and an existing one
    unless --overwrite and it is an earlier llmquant output (or empty)."""
    out_real, source_real = out.resolve(), source.resolve()
    if out_real == source_real or source_real in out_real.parents or out_real in source_real.parents:
        raise CheckpointError(f"output {out} is the source folder, inside it or a parent of it; choose another")
    clean_stale(out)  # a swap cut short puts the old output back first: it then counts as existing
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise CheckpointError(f"output {out} already exists; pass --overwrite to replace it")
    if not is_llmquant_output(out):
        raise CheckpointError(
            f"refusing to overwrite {out}: it is not an earlier llmquant output (no config.json with a "
            "quantization_config llmquant wrote) nor an empty folder"
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
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-(\d+)(?:-[0-9a-f]+)?$")
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


def _rename_noreplace(source: Path, target: Path) -> None:
    """Rename `source` to `target`, failing with FileExistsError if `target` exists (even an empty
    folder, which a plain rename(2) would silently replace). Uses renameat2(RENAME_NOREPLACE)
    where libc and the file system have it; elsewhere a check and a rename (the lock in
    `staged_output` still excludes other llmquant runs)."""
    libc_name = ctypes.util.find_library("c")
    renameat2 = getattr(ctypes.CDLL(libc_name, use_errno=True), "renameat2", None) if libc_name else None
    if renameat2 is not None:
        at_fdcwd, rename_noreplace = -100, 1
        if renameat2(at_fdcwd, os.fsencode(source), at_fdcwd, os.fsencode(target), rename_noreplace) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EINVAL):  # EINVAL: this file system lacks the flag
            raise OSError(code, os.strerror(code), str(target))
    if target.exists() or target.is_symlink():
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    source.rename(target)


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive flock on `folder` itself (nothing is left behind, unlike a lock file)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _publish(staging: Path, out: Path, overwrite: bool, tag: str) -> Path | None:
    """Move the complete `staging` folder to `out`, under the parent's lock; returns the replaced
    folder to delete (after the lock is released), if any."""
    with _locked(out.parent):
        if not (out.exists() or out.is_symlink()):
            try:
                _rename_noreplace(staging, out)
            except FileExistsError:
                raise CheckpointError(
                    f"output {out} appeared while this run was writing it; not replaced "
                    "(pass --overwrite to replace it)"
                ) from None
            return None
        if not overwrite:
            raise CheckpointError(
                f"output {out} appeared while this run was writing it (another run?); not replaced "
                "(pass --overwrite to replace it)"
            )
        if not is_llmquant_output(out):
            raise CheckpointError(
                f"refusing to overwrite {out}: it appeared while this run was writing and is not an earlier "
                "llmquant output nor an empty folder"
            )
        trash = out.parent / f".{out.name}.old-{os.getpid()}-{tag}"
        out.rename(trash)
        try:
            _rename_noreplace(staging, out)
        except BaseException:
            trash.rename(out)
            raise
        return trash


@contextmanager
def staged_output(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder beside `out`; on success it becomes `out` atomically, on
    any error (or interrupt) it is removed and `out` is left as it was. An `out` existing at
    that point is replaced only with `overwrite` and only if it is an earlier llmquant output
    (`check_output` said so at the start; it is asked again under the lock, since another run may
    have published in between); else CheckpointError naming it."""
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    tag = secrets.token_hex(4)  # unique per run even within one process
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}-{tag}"
    staging.mkdir()
    try:
        yield staging
        for path in staging.iterdir():
            path.chmod(0o644)  # safetensors writes owner-only files; a published folder is readable
        staging.chmod(0o755)
        trash = _publish(staging, out, overwrite, tag)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in created:  # parents this run made, if still empty
            try:
                folder.rmdir()
            except OSError:
                break
        raise
