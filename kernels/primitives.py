"""Triton building blocks shared by the adapter kernels, correct on the GPU and under the interpreter.

Triton's CPU interpreter (``TRITON_INTERPRET=1``, used by the CI tests) differs from the GPU in two
places these kernels touch: its ``dot`` multiplies the raw bits of bf16 operands, and its fp32 -> bf16
cast truncates instead of rounding to nearest even. With ``INTERPRETER`` set (a constexpr the
launchers pass) the helpers below take an exact detour; on the GPU they are the plain operation.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["dot_acc", "cast"]


@triton.jit
def dot_acc(acc, a, b, PRECISION: tl.constexpr, INTERPRETER: tl.constexpr):
    """``acc + a @ b`` for operands of one dtype, accumulated in fp32."""
    if INTERPRETER:  # the same products, in fp32 (exact for bf16/fp16 operands)
        return acc + tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


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
