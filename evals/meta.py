"""What every result file records (device, versions, commit, date) and the tables it prints."""

from __future__ import annotations

import datetime
import json
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve()


def _run(cmd: list[str]) -> str | None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip().splitlines()[0] if done.stdout.strip() else None


def _checkout() -> Path | None:
    """The source checkout this module runs from (`pip install -e .`), asked of git; None for an
    installed copy, whose site-packages may well lie inside some other repository (a project's .venv)."""
    top = _run(["git", "-C", str(HERE.parent), "rev-parse", "--show-toplevel"])
    return Path(top) if top and (Path(top) / "evals" / HERE.name).resolve() == HERE else None


REPO = _checkout()
# Benchmarks write here by default: the checkout's results folder, else evals/results under the working directory.
RESULTS = (REPO or Path()) / "evals" / "results"


def git_commit() -> str | None:
    """HEAD of the llmquant checkout this file lives in, or None for an installed copy."""
    return _run(["git", "-C", str(REPO), "rev-parse", "HEAD"]) if REPO else None


def environment(device: torch.device | str | None = None) -> dict:
    """Device, driver and library versions, git commit and UTC date."""
    import transformers

    import llmquant

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    else:
        name = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
        driver = None
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "llmquant": llmquant.__version__,
    }
    for optional in ("triton", "datasets"):
        try:
            versions[optional] = __import__(optional).__version__
        except ImportError:
            pass
    return {
        "device": name,
        "driver": driver,
        "cuda": torch.version.cuda,
        **versions,
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def console_table(columns: list[str], rows: list[list[str]]) -> str:
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]
    line = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([line.format(*columns)] + [line.format(*row) for row in rows])


def require_cuda(what: str) -> None:
    """Exit with a one-line message when there is no GPU to measure on."""
    if not torch.cuda.is_available():
        sys.exit(f"{what} needs a CUDA device (torch.cuda.is_available() is False)")


def write_results(out_dir: Path, stem: str, payload: dict, columns: list[str], rows: list[list[str]], title: str):
    """Write <stem>-<device>.json (the payload, with its "env") and .md (environment + table)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    device = re.sub(r"[^A-Za-z0-9_.-]+", "_", payload["env"]["device"])
    json_path, md_path = out_dir / f"{stem}-{device}.json", out_dir / f"{stem}-{device}.md"
    json_path.write_text(json.dumps(payload, indent=1) + "\n")
    header = ", ".join(f"{k} {v}" for k, v in payload["env"].items())
    md_path.write_text(f"# {title}\n\n{header}\n\n{markdown_table(columns, rows)}\n")
    return json_path, md_path
