"""Peak memory of a stretch of code: CUDA allocations, or resident memory sampled on CPU."""

from __future__ import annotations

import threading
import time

import torch


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class PeakMemory:
    """`with PeakMemory(device) as peak:` ... then peak.extra_bytes: the peak above the start.

    CUDA: torch.cuda.max_memory_allocated above the allocation at entry. CPU: the process's
    resident set, sampled every 20 ms by a thread, above its value at entry (Linux /proc).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.extra_bytes = 0
        self.kind = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "resident memory (sampled)"

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        self._start = self._peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss())
            time.sleep(0.02)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.extra_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
            return
        self._stop.set()
        self._thread.join()
        self.extra_bytes = max(self._peak, _rss()) - self._start
