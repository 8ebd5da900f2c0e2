"""Rank adapter ``y = At^T (keep * B x) + bias``, ``keep = |B x| >= thresholds``: decode kernels and launcher.

One decode token (up to 8 with an explicit config) takes three launches::

    router_kernel:      zpart[j] = x @ B[:, K_j]^T            # dense, split-K over the input: [S_z, T, nB] fp32
    masked_gemv_kernel: z = sum_j zpart[j]                    # RANK prologue: fixed-order sum, mask, flags
                        partials = (keep * z) @ At            # rows of At (ranks) nobody kept are never read
    split_sum_kernel:   y = sum of the partials + bias

The router is always paid (``B`` is read in full: it decides the mask). Its partial sums are summed
in the masked GEMV's load stage, so the flags cost no launch and no extra pass; shapes never depend
on the mask (flags, not index lists), so the whole thing is CUDA-graph safe. More tokens run cuBLAS
GEMMs with the same mask (masked_gemm.py; configs.use_kernels says where the line is).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ranapass.kernels.configs import KernelConfig, rank_adapter_configs, use_kernels
from ranapass.kernels.launch import flatten_tokens, launch
from ranapass.kernels.masked_gemv import PROLOGUE_RANK, masked_gemv
from ranapass.kernels.masked_gemm import rank_adapter_gemm

__all__ = ["router_kernel", "rank_adapter"]


@triton.jit
def router_kernel(
    x_ptr, b_ptr, zpart_ptr,        # x [T, N]; B [R, N] row-major; zpart [S, T, R] fp32
    T, N, R,
    K_PER_SPLIT,                    # input columns per split, a multiple of BLOCK_K
    stride_xt, stride_br,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``zpart[s, t, r] = sum over this split's inputs k of x[t, k] * B[r, k]`` (fp32 multiply-add)."""
    # ---------------------------------------------------------------- program -> tiles
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_t = tl.arange(0, BLOCK_T)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    t_ok = offs_t < T
    r_ok = offs_r < R

    # ---------------------------------------------------------------- dense reduction over this split
    if BLOCK_T == 1:
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    k_lo = pid_s * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, N)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_hi
        b = tl.load(b_ptr + offs_r[:, None] * stride_br + offs_k[None, :], mask=r_ok[:, None] & k_ok[None, :],
                    other=0.0, eviction_policy="evict_first").to(tl.float32)
        if BLOCK_T == 1:
            x = tl.load(x_ptr + offs_k, mask=k_ok, other=0.0, eviction_policy="evict_last").to(tl.float32)
            acc += tl.sum(b * x[None, :], axis=1)
        else:
            x = tl.load(x_ptr + offs_t[:, None] * stride_xt + offs_k[None, :], mask=t_ok[:, None] & k_ok[None, :],
                        other=0.0, eviction_policy="evict_last").to(tl.float32)
            acc += tl.sum(x[:, None, :] * b[None, :, :], axis=2)

    # ---------------------------------------------------------------- store this split's partial z
    if BLOCK_T == 1:
        tl.store(zpart_ptr + pid_s * T * R + offs_r, acc, mask=r_ok)
    else:
        tl.store(zpart_ptr + pid_s * T * R + offs_t[:, None] * R + offs_r[None, :], acc,
                 mask=t_ok[:, None] & r_ok[None, :])


def rank_adapter(
    x: torch.Tensor,
    B: torch.Tensor,
    At: torch.Tensor,
    thresholds: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: tuple[KernelConfig, KernelConfig] | None = None,
) -> torch.Tensor:
    """Run the rank adapter on ``x: [..., n]``; returns ``[..., m]`` in ``x.dtype``.

    Args:
        x: input, any leading dims; B ``[nB, n]`` and At ``[nB, m]`` in one floating dtype.
        thresholds: ``[nB]`` float32.
        bias: ``[m]`` or None.
        config: decode (router, masked GEMV) tiles; default from ``configs.rank_adapter_configs``.
    """
    x2, lead = flatten_tokens(x)
    T, n = x2.shape
    nB, m = At.shape
    if B.shape != (nB, n) or thresholds.shape != (nB,):
        raise ValueError(f"rank_adapter: x [.., {n}], B {tuple(B.shape)}, At {tuple(At.shape)} and thresholds "
                         f"{tuple(thresholds.shape)} do not agree (want B [nB, n], At [nB, m], thresholds [nB])")
    if B.stride(-1) != 1 or At.stride(-1) != 1:
        raise ValueError("rank_adapter: B and At must have a contiguous last dimension")
    if not use_kernels(T, config):
        return rank_adapter_gemm(x2, B, At, thresholds, bias).reshape(*lead, m)
    rc, gc = config if config is not None else rank_adapter_configs(n, nB, m, T)

    # z = B x as split-K partials: [S_z, T, nB]
    k_per_split = triton.cdiv(triton.cdiv(n, rc.splits), rc.block_k) * rc.block_k
    z_splits = triton.cdiv(n, k_per_split)
    zpart = torch.empty((z_splits, T, nB), device=x.device, dtype=torch.float32)
    launch(router_kernel)[(triton.cdiv(nB, rc.block_n), z_splits)](
        x2, B, zpart, T, n, nB, k_per_split, x2.stride(0), B.stride(0),
        BLOCK_T=triton.next_power_of_2(T), BLOCK_R=rc.block_n, BLOCK_K=rc.block_k,
        num_warps=rc.num_warps, num_stages=rc.num_stages)

    # y = (keep * z) At (+ bias)
    y = masked_gemv(zpart, None, thresholds, At, bias, x.dtype, gc, PROLOGUE_RANK, in_splits=z_splits)
    return y.reshape(*lead, m)
