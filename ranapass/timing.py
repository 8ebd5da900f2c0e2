"""Where a profile's time and GPU memory go: seconds per stage and the peak memory of the model's GPUs.

GPU work is asynchronous, so ``Stopwatch`` synchronizes the model's devices at every stage boundary:
each stage is charged for the work it queued, not for the work of the stage before it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator

import torch

__all__ = ["Stopwatch", "model_devices", "reset_peak_gpu_memory", "peak_gpu_memory"]


def model_devices(model: torch.nn.Module) -> list[torch.device]:
    """The devices holding the model's parameters (several under a device map)."""
    return sorted({p.device for p in model.parameters()}, key=str)


class Stopwatch:
    """Seconds per named stage; a stage opened inside another is recorded as ``outer.inner``."""

    def __init__(self, devices: Iterable[torch.device] = ()):
        self.devices = [d for d in devices if d.type == "cuda"]  # not the CPU, nor meta (offloaded layers)
        self.seconds: dict[str, float] = {}
        self._open: list[str] = []

    def _synchronize(self) -> None:
        for device in self.devices:
            torch.cuda.synchronize(device)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the enclosed block, adding to the stage's seconds if it ran before."""
        key = ".".join([*self._open, name])
        self._open.append(name)
        self.seconds.setdefault(key, 0.0)
        self._synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._synchronize()
            self._open.pop()
            self.seconds[key] += time.perf_counter() - start

    def rounded(self, digits: int = 2) -> dict[str, float]:
        """The seconds per stage, rounded, in the order the stages were first opened."""
        return {k: round(v, digits) for k, v in self.seconds.items()}


def reset_peak_gpu_memory(devices: Iterable[torch.device]) -> None:
    """Start measuring the peak memory of the CUDA devices among ``devices`` from now."""
    for device in devices:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)


def peak_gpu_memory(devices: Iterable[torch.device]) -> int | None:
    """The largest ``torch.cuda.max_memory_allocated`` over the CUDA devices among ``devices`` (the figure
    that must fit on each of them) since the last reset, or None when none is a CUDA device."""
    peaks = [torch.cuda.max_memory_allocated(d) for d in devices if d.type == "cuda"]
    return max(peaks) if peaks else None
