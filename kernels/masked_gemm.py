"""Several tokens (prefill, batched decode): cuBLAS GEMMs with the decode kernels' masks.

Prefill is compute-bound, and the union of several tokens' masks keeps nearly every weight row, so
skipping rows saves nothing worth a custom GEMM there; what matters is that the math is the
one-token math, so the KV cache a prefill writes is the one the masked model would write token by
token::

    rank:   z = x B^T (fp32 out)  ->  zm = where(|z| >= t, z, 0)  ->  y = zm At + bias
    neuron: xm = where(|x| >= t, x, 0)  ->  y = xm Wt + bias        (gated: x = act(gate) * up)

The masks are the decode masks exactly (z is kept in fp32, like the router's sums); the second GEMM
takes ``zm`` rounded to the weights' dtype (the decode kernel multiplies it in fp32): a difference
within the dtype's rounding. Inside a triton_op these are plain torch ops, so Inductor fuses the
pointwise parts and calls cuBLAS for the GEMMs.
"""

from __future__ import annotations

import torch

from ranapass.kernels.reference import gated_activation

__all__ = ["rank_adapter_gemm", "neuron_adapter_gemm", "gated_neuron_adapter_gemm"]

_MM_FP32_OUT = hasattr(torch.ops.aten.mm, "dtype")  # torch.mm(..., out_dtype=) for bf16/fp16 on CUDA


def _scores(x: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``z = x B^T`` accumulated and returned in fp32 (bf16/fp16 GEMM with an fp32 output on CUDA)."""
    if _MM_FP32_OUT and x.device.type == "cuda" and B.dtype != torch.float32 and x.dtype == B.dtype:
        return torch.mm(x, B.t(), out_dtype=torch.float32)
    return torch.mm(x.float(), B.float().t())


def _finish(v: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    y = torch.mm(v.to(W.dtype), W)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(out_dtype)


def rank_adapter_gemm(x2: torch.Tensor, B: torch.Tensor, At: torch.Tensor, thresholds: torch.Tensor,
                         bias: torch.Tensor | None) -> torch.Tensor:
    """``y = At^T (keep * B x) + bias`` for ``x2: [T, n]``; returns ``[T, m]`` in ``x2.dtype``."""
    z = _scores(x2, B)
    zm = torch.where(z.abs() >= thresholds, z, 0.0)
    return _finish(zm, At, bias, x2.dtype)


def neuron_adapter_gemm(x2: torch.Tensor, Wt: torch.Tensor, thresholds: torch.Tensor,
                           bias: torch.Tensor | None) -> torch.Tensor:
    """``y = (keep * x) Wt + bias`` for ``x2: [T, n]``; returns ``[T, m]`` in ``x2.dtype``."""
    xm = torch.where(x2.abs() >= thresholds, x2, 0.0)  # |x| is exact in x's dtype; the compare runs in fp32
    return _finish(xm, Wt, bias, x2.dtype)


def gated_neuron_adapter_gemm(g2: torch.Tensor, u2: torch.Tensor, Wt: torch.Tensor, thresholds: torch.Tensor,
                                 bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """The neuron adapter on ``h = act(gate) * up`` (rounded like the reference) for ``[T, n]`` inputs."""
    return neuron_adapter_gemm(gated_activation(g2, u2, activation), Wt, thresholds, bias)
