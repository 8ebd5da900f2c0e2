"""Small helpers shared by the kernel launchers: how a kernel is launched, and token flattening."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ranapass.capabilities import triton_interpret

__all__ = ["launch", "direct_launch", "flatten_tokens"]


def launch(kernel):
    """``kernel`` as a triton_op body may launch it: through ``wrap_triton`` so torch.compile traces it.

    Under ``TRITON_INTERPRET=1`` the kernel is an interpreted function, launched as is (a triton_op
    cannot run it under torch.compile; tests call the launchers directly).
    """
    if triton_interpret():
        return kernel
    return torch.library.wrap_triton(kernel)


@contextlib.contextmanager
def direct_launch() -> Iterator[None]:
    """Launch kernels straight away when a launcher is called outside an op (benchmarks, GPU tests).

    Outside a triton_op, ``wrap_triton`` dispatches through a higher-order op in eager mode, which is
    correct but slow on the host; inside the op torch already does what this context does.
    """
    from torch._library.triton import set_wrap_triton_enabled

    with set_wrap_triton_enabled(False):
        yield


def flatten_tokens(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``x: [..., n]`` -> (``[T, n]`` with a contiguous last dim, leading shape)."""
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2, lead
