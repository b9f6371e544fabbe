"""One progress bar for the whole package: a tqdm bar on a terminal, silence in logs and pipes."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any


def progress_bar(iterable: Iterable | None = None, *, enabled: bool = True, **kwargs: Any) -> Any:
    """tqdm(iterable, **kwargs), disabled unless `enabled` and stderr is a terminal.

    A redrawn bar in a non-interactive log is a line of carriage returns; the commands print their
    own one-line summaries instead.
    """
    from tqdm.auto import tqdm

    interactive = enabled and sys.stderr is not None and sys.stderr.isatty()
    return tqdm(iterable, disable=not interactive, **kwargs)
