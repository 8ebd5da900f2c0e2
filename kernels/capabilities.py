"""What this machine can run: one place for kernel dispatch and test skips to ask."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

__all__ = ["has_triton", "has_cuda", "triton_interpret"]


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
