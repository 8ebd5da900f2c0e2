"""Triton building blocks shared by the adapter kernels, correct on the GPU and under the interpreter.

``cast``: Triton's CPU interpreter (``TRITON_INTERPRET=1``, used by the CI tests) casts fp32 to bf16 by
truncation instead of rounding to nearest even. With ``INTERPRETER`` set (a constexpr the launchers
pass) ``cast`` rounds the bits first; on the GPU it is the plain cast.

``launch_dependents`` / ``wait_for_prior_grid``: programmatic dependent launch (sm_90+). A kernel
launched with ``launch_pdl=True`` may start while the kernel before it on the stream is still running
(once every program of that one has called ``launch_dependents`` or exited); ``wait_for_prior_grid``
blocks until that kernel has finished and its writes are visible. Before the wait a kernel may only
read what no earlier kernel writes (weights, thresholds) and must write nothing. With ``PDL`` off (the
interpreter, older cards) both are no-ops.
"""

from __future__ import annotations

import triton
import triton.language as tl

from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

__all__ = ["cast", "launch_dependents", "wait_for_prior_grid"]


@triton.jit
def cast(x, DTYPE: tl.constexpr, INTERPRETER: tl.constexpr):
    """``x.to(DTYPE)``, rounding to nearest even."""
    if INTERPRETER:
        if DTYPE == tl.bfloat16:
            if x.dtype == tl.float32:  # round the fp32 bits to bf16 precision, so the cast is exact
                bits = x.to(tl.uint32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
                x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)


@triton.jit
def launch_dependents(PDL: tl.constexpr):
    """Let the next kernel on the stream launch now (it waits for this one before it reads or writes)."""
    if PDL:
        gdc_launch_dependents()


@triton.jit
def wait_for_prior_grid(PDL: tl.constexpr):
    """Block until the previous kernel on the stream has finished and its writes are visible."""
    if PDL:
        gdc_wait()
