"""What this machine can run: one place for kernel dispatch and test skips to ask."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

__all__ = ["has_triton", "has_cuda", "triton_interpret", "torch_version_at_least", "cuda_capability"]


@functools.cache
def has_triton() -> bool:
    """True when the ``triton`` package imports (it may still lack a GPU driver)."""
    return importlib.util.find_spec("triton") is not None


def has_cuda() -> bool:
    """True when a CUDA device is usable."""
    return torch.cuda.is_available()


def triton_interpret() -> bool:
    """True when ``TRITON_INTERPRET=1``: kernels run on CPU tensors through Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def torch_version_at_least(version: str) -> bool:
    """Compare the running torch's release with ``version`` numerically (not as text)."""
    def parse(v: str) -> tuple[int, ...]:
        return tuple(int(p) for p in v.split("+")[0].split(".")[:3] if p.isdigit())

    return parse(torch.__version__) >= parse(version)


def cuda_capability() -> tuple[int, int] | None:
    """(major, minor) of the current CUDA device, or None without one."""
    return torch.cuda.get_device_capability() if has_cuda() else None
