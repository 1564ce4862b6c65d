"""Peak memory of one call: the process's peak RSS on the CPU (Linux), the allocator's peak on a GPU.

Used by ``benchmark.py`` (inference) and ``experiments/training_cost.py`` (training steps).
"""
from __future__ import annotations

import torch

from .inference import tune_allocator


def _rss_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux ``clear_refs`` 5)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory_mib(fn, device: torch.device) -> float | None:
    """Peak memory of one call of ``fn`` above what was in use just before it, in MiB (None if unknown)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20
    tune_allocator(False)                     # measure with glibc's defaults: retained memory would hide the peak
    if not _reset_peak_rss():
        return None
    before = _rss_kib("VmRSS")
    fn()
    peak = _rss_kib("VmHWM")
    return None if before is None or peak is None else max(peak - before, 0) / 1024


__all__ = ["peak_memory_mib"]
