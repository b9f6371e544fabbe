"""Local path or Hugging Face Hub id, and whether the Hub may be reached: one answer for models
(checkpoint/source.py), calibration text (calibration/data.py) and eval datasets (evals/data.py).
Imports no torch."""

from __future__ import annotations

import os
import re
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def looks_like_path(src: str) -> bool:
    """A local path, not a Hub id: absolute, starting with . or ~, a backslash, or more than one /."""
    return src.startswith((".", "~", "/")) or "\\" in src or src.count("/") > 1 or Path(src).is_absolute()


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set: a Hub dataset then fails at once, with
    our message, instead of after datasets' retries."""
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
