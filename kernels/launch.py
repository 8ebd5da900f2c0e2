"""Small helpers shared by the kernel launchers: how a kernel is launched, and token flattening."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch._library.triton import is_wrap_triton_enabled

from ranapass.kernels.capabilities import triton_interpret

__all__ = ["launch", "direct_launch", "flatten_tokens", "pdl_supported", "use_pdl", "pdl_launch",
           "launch_opaque"]


def launch(kernel):
    """``kernel`` as a triton_op body may launch it: through ``wrap_triton`` so torch.compile traces it.

    Under ``TRITON_INTERPRET=1`` the kernel is an interpreted function, launched as is (a triton_op
    cannot run it under torch.compile; tests call the launchers directly).
    """
    if triton_interpret():
        return kernel
    return torch.library.wrap_triton(kernel)


def pdl_supported(device: torch.device) -> bool:
    """Can kernels on ``device`` use programmatic dependent launch (kernels/primitives.py)?

    Yes on sm_90 and newer, outside the interpreter, unless ``RANAPASS_PDL=0``.
    """
    return (device.type == "cuda" and not triton_interpret() and os.environ.get("RANAPASS_PDL", "1") != "0"
            and torch.cuda.get_device_capability(device)[0] >= 9)


def use_pdl(device: torch.device) -> bool:
    """Launch this kernel with ``launch_pdl=True``? Only when it is launched directly: Inductor's
    launcher for a kernel it traced passes no launch attributes (see ``launch_opaque``)."""
    return pdl_supported(device) and not is_wrap_triton_enabled()


def pdl_launch(pdl: bool) -> dict[str, bool]:
    """The launch option that turns programmatic dependent launch on, as keyword arguments."""
    return {"launch_pdl": True} if pdl else {}


def launch_opaque(device: torch.device) -> bool:
    """Should a decode op being traced by torch.compile hand Inductor an opaque op (ops.py) that launches
    its kernels directly, instead of the kernels themselves?

    Yes when Inductor runs the graph under CUDA graphs (``mode="reduce-overhead"``) with programmatic
    dependent launch for its own kernels (``triton.enable_pdl``, ``TORCHINDUCTOR_ENABLE_PDL=1``) and
    the card has it: replays pay no host cost for the opaque call, and the direct launch is the one
    that can overlap each kernel's start with the end of the one before. Without PDL in Inductor's
    kernels around them, the opaque ops measured no faster (benchmarks/RESULTS.md), so Inductor
    launches the kernels itself.
    """
    from torch._inductor import config

    return (is_wrap_triton_enabled() and bool(config.triton.cudagraphs)
            and bool(getattr(config.triton, "enable_pdl", False)) and pdl_supported(device))


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
