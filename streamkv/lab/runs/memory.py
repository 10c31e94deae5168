"""The process's peak memory inside a block: what a benchmark or a long task reports beside its numbers."""

from __future__ import annotations

import ctypes
import gc
import re
from pathlib import Path

import torch


def _status_kb(field_name: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else None


class PeakMemory:
    """Peak resident memory of this process inside a ``with`` block (Linux VmHWM, reset on entry),
    and ``torch.cuda.max_memory_allocated`` on GPU. Freed heap is returned to the OS first."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_rss = self.start_rss = self.cuda_peak = None

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self._hwm = True
        except OSError:
            self._hwm = False
        self.start_rss = _status_kb("VmRSS")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.cuda_peak = torch.cuda.max_memory_allocated(self.device)
        self.peak_rss = _status_kb("VmHWM") if self._hwm else None

    def as_dict(self) -> dict[str, float | None]:
        mib = lambda kb: None if kb is None else kb / 1024  # noqa: E731
        return {
            "peak_rss_mib": mib(self.peak_rss),
            "peak_rss_delta_mib": mib(None if self.peak_rss is None else self.peak_rss - self.start_rss),
            "cuda_peak_mib": None if self.cuda_peak is None else self.cuda_peak / 2**20,
        }


def resident_mib() -> float | None:
    """This process's resident memory now (MiB), after returning freed heap to the OS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024
