"""Triton building blocks shared by the adapter kernels, correct on the GPU and under the interpreter.

Triton's CPU interpreter (``TRITON_INTERPRET=1``, used by the CI tests) casts fp32 to bf16 by
truncation instead of rounding to nearest even. With ``INTERPRETER`` set (a constexpr the launchers
pass) ``cast`` rounds the bits first; on the GPU it is the plain cast.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["cast"]


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
