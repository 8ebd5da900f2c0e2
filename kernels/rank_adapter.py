"""Rank adapter ``y = At^T (keep * B x) + bias``, ``keep = |B x| >= thresholds``: decode kernels and launcher.

One decode token (up to 8 with an explicit config) takes two launches::

    router_kernel:      zpart[j] = x @ B[:, K_j]^T            # dense, split-K over the input: [S_z, T, nB] fp32
                        tickets = 0                           # one program zeroes the GEMV's tile tickets
    masked_gemv_kernel: z = sum_j zpart[j]                    # RANK prologue: fixed-order sum, mask, flags
                        y = (keep * z) @ At + bias            # rows of At (ranks) nobody kept are never read;
                                                              # the last split of a tile sums the partials

With programmatic dependent launch (sm_90+, launch.use_pdl) the masked GEMV launches while the
router runs and waits for it in hardware. With ``frozen_weights`` (the opaque decode ops of a compiled
graph, whose weights are its parameters) the router also requests its first slice of ``B`` before it
waits for the kernel that wrote ``x``, so its weight stream starts while that kernel drains.

The router is always paid (``B`` is read in full: it decides the mask). Its partial sums are summed
in the masked GEMV's load stage, so the flags cost no launch and no extra pass; shapes never depend
on the mask (flags, not index lists), so the whole thing is CUDA-graph safe. More tokens run cuBLAS
GEMMs with the same mask (masked_gemm.py; configs.use_kernels says where the line is).

Two rank adapters that read one input (gate and up of a gated MLP, each with its own B and mask)
share both launches (``rank_adapter_pair``): the router stacks both ``z``, and one masked GEMV
launch holds both units' programs, as the reference implementation's decode path does for B.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ranapass.kernels.configs import KernelConfig, rank_adapter_configs, use_kernels
from ranapass.kernels.launch import flatten_tokens, launch, pdl_launch, use_pdl
from ranapass.kernels.masked_gemv import PROLOGUE_RANK, masked_gemv, masked_gemv_pair
from ranapass.kernels.masked_gemm import rank_adapter_gemm
from ranapass.kernels.primitives import launch_dependents, wait_for_prior_grid

__all__ = ["router_kernel", "rank_adapter", "rank_adapter_pair"]


@triton.jit
def _router_step(acc, b, x_ptr, offs_t, t_ok, offs_k, k_ok, stride_xt, BLOCK_T: tl.constexpr):
    """``acc += x[:, offs_k] @ b^T`` for one slice of B (``b [BLOCK_R, BLOCK_K]``), fp32 multiply-add."""
    b = b.to(tl.float32)
    if BLOCK_T == 1:
        x = tl.load(x_ptr + offs_k, mask=k_ok, other=0.0, eviction_policy="evict_last").to(tl.float32)
        acc += tl.sum(b * x[None, :], axis=1)
    else:
        x = tl.load(x_ptr + offs_t[:, None] * stride_xt + offs_k[None, :], mask=t_ok[:, None] & k_ok[None, :],
                    other=0.0, eviction_policy="evict_last").to(tl.float32)
        acc += tl.sum(x[:, None, :] * b[None, :, :], axis=2)
    return acc


@triton.jit
def router_kernel(
    x_ptr, b_ptr, b2_ptr, zpart_ptr,  # x [T, N]; B [R1, N], B2 [R - R1, N] row-major; zpart [S, T, R] fp32
    ticket_ptr,                     # int32 [N_TICKETS]: the masked GEMV's tile tickets, zeroed here
    T, N, R, R1,
    TILES1,                         # rank tiles of B; the programs past them read B2 (ranks R1 and up)
    K_PER_SPLIT,                    # input columns per split, a multiple of BLOCK_K
    N_TICKETS,
    stride_xt, stride_br,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,              # launched with programmatic dependent launch (primitives.py)
    EARLY_B: tl.constexpr,          # PDL: request the first slice of B before the wait (B is a frozen weight)
):
    """``zpart[s, t, r] = sum over this split's inputs k of x[t, k] * B[r, k]`` (fp32 multiply-add).

    One launch serves one rank adapter (``B2`` is ``B``, ``R1 = R``) or two that read the same input
    (``B`` then ``B2`` stacked in ``z``, as gate and up of a gated MLP). Program (0, 0) also zeroes the
    tickets of the masked GEMV launched next (masked_gemv.py), so that kernel needs no fill launch.
    With ``EARLY_B`` each program requests its first slice of ``B`` before the wait for the kernel that
    wrote ``x`` (only for weights no kernel writes: a compiled graph's parameters).
    """
    # ---------------------------------------------------------------- program -> tiles
    launch_dependents(PDL)          # the masked GEMV may launch now; it waits for this kernel
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    second = pid_r >= TILES1
    r0 = tl.where(second, R1, 0)    # this program's first rank in z
    rows = tl.where(second, R - R1, R1)
    if second:
        b_ptr = b2_ptr
    offs_t = tl.arange(0, BLOCK_T)
    offs_r = tl.where(second, pid_r - TILES1, pid_r) * BLOCK_R + tl.arange(0, BLOCK_R)  # rows of this B
    t_ok = offs_t < T
    r_ok = offs_r < rows

    # ---------------------------------------------------------------- dense reduction over this split
    if BLOCK_T == 1:
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    k_lo = pid_s * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, N)
    b_rows = b_ptr + offs_r[:, None] * stride_br
    offs_k = k_lo + tl.arange(0, BLOCK_K)  # the first slice, requested before the wait
    k_ok = offs_k < k_hi
    if not EARLY_B:
        wait_for_prior_grid(PDL)    # x, B and the memory written below belong to earlier kernels until now
    b = tl.load(b_rows + offs_k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0, eviction_policy="evict_first")
    if EARLY_B:
        wait_for_prior_grid(PDL)    # x and the memory written below belong to earlier kernels until now
    if pid_r + pid_s == 0:
        for i in range(0, N_TICKETS, 128):
            offs_i = i + tl.arange(0, 128)
            tl.store(ticket_ptr + offs_i, tl.zeros((128,), dtype=tl.int32), mask=offs_i < N_TICKETS)
    acc = _router_step(acc, b, x_ptr, offs_t, t_ok, offs_k, k_ok, stride_xt, BLOCK_T)
    for k0 in range(k_lo + BLOCK_K, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_hi
        b = tl.load(b_rows + offs_k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0,
                    eviction_policy="evict_first")
        acc = _router_step(acc, b, x_ptr, offs_t, t_ok, offs_k, k_ok, stride_xt, BLOCK_T)

    # ---------------------------------------------------------------- store this split's partial z
    z_ptr = zpart_ptr + pid_s * T * R + r0
    if BLOCK_T == 1:
        tl.store(z_ptr + offs_r, acc, mask=r_ok)
    else:
        tl.store(z_ptr + offs_t[:, None] * R + offs_r[None, :], acc, mask=t_ok[:, None] & r_ok[None, :])


def _check(name: str, n: int, B: torch.Tensor, At: torch.Tensor, thresholds: torch.Tensor) -> None:
    nB = At.shape[0]
    if B.shape != (nB, n) or thresholds.shape != (nB,):
        raise ValueError(f"{name}: x [.., {n}], B {tuple(B.shape)}, At {tuple(At.shape)} and thresholds "
                         f"{tuple(thresholds.shape)} do not agree (want B [nB, n], At [nB, m], thresholds [nB])")
    if B.stride(-1) != 1 or At.stride(-1) != 1:
        raise ValueError(f"{name}: B and At must have a contiguous last dimension")


def _router(x2: torch.Tensor, Bs: list[torch.Tensor], rc: KernelConfig, n_tickets: int,
            frozen_weights: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``z = B x`` of one or two ``B`` (stacked in z) as split-K partials ``[S_z, T, R]``, and zeroed tickets."""
    T, n = x2.shape
    R1, R = Bs[0].shape[0], sum(B.shape[0] for B in Bs)
    k_per_split = triton.cdiv(triton.cdiv(n, rc.splits), rc.block_k) * rc.block_k
    z_splits = triton.cdiv(n, k_per_split)
    zpart = torch.empty((z_splits, T, R), device=x2.device, dtype=torch.float32)
    tickets = torch.empty(n_tickets, device=x2.device, dtype=torch.int32)
    tiles1 = triton.cdiv(R1, rc.block_n)
    pdl = use_pdl(x2.device)
    launch(router_kernel)[(tiles1 + triton.cdiv(R - R1, rc.block_n), z_splits)](
        x2, Bs[0], Bs[-1], zpart, tickets, T, n, R, R1, tiles1, k_per_split, n_tickets, x2.stride(0),
        Bs[0].stride(0), BLOCK_T=triton.next_power_of_2(T), BLOCK_R=rc.block_n, BLOCK_K=rc.block_k, PDL=pdl,
        EARLY_B=pdl and frozen_weights, num_warps=rc.num_warps, num_stages=rc.num_stages, **pdl_launch(pdl))
    return zpart, tickets


def rank_adapter(
    x: torch.Tensor,
    B: torch.Tensor,
    At: torch.Tensor,
    thresholds: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: tuple[KernelConfig, KernelConfig] | None = None,
    frozen_weights: bool = False,
) -> torch.Tensor:
    """Run the rank adapter on ``x: [..., n]``; returns ``[..., m]`` in ``x.dtype``.

    Args:
        x: input, any leading dims; B ``[nB, n]`` and At ``[nB, m]`` in one floating dtype.
        thresholds: ``[nB]`` float32.
        bias: ``[m]`` or None.
        config: decode (router, masked GEMV) tiles; default from ``configs.rank_adapter_configs``.
        frozen_weights: no kernel writes ``B`` (with PDL the router reads it before the previous kernel ends).
    """
    x2, lead = flatten_tokens(x)
    T, n = x2.shape
    _check("rank_adapter", n, B, At, thresholds)
    nB, m = At.shape
    if not use_kernels(T, config):
        return rank_adapter_gemm(x2, B, At, thresholds, bias).reshape(*lead, m)
    rc, gc = config if config is not None else rank_adapter_configs(n, nB, m, T)
    zpart, tickets = _router(x2, [B], rc, triton.cdiv(m, gc.block_n), frozen_weights)
    y = masked_gemv(zpart, None, thresholds, At, bias, x.dtype, gc, PROLOGUE_RANK, in_splits=zpart.shape[0],
                    tickets=tickets)
    return y.reshape(*lead, m)


def rank_adapter_pair(
    x: torch.Tensor,
    first: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None],
    second: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None],
    config: tuple[KernelConfig, KernelConfig] | None = None,
    frozen_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rank adapters on one input (gate and up of a gated MLP) in two launches instead of four.

    Each of ``first`` and ``second`` is ``(B, At, thresholds, bias)`` as in ``rank_adapter``; both
    biases or neither. One router launch computes both ``z`` (stacked), one masked-GEMV launch both
    outputs. The tiles are the first unit's own (``configs.rank_adapter_configs``): the launches hold
    the programs of both units' launches. More tokens than the kernels take run the GEMMs per unit.
    ``frozen_weights`` as in ``rank_adapter``.
    """
    x2, lead = flatten_tokens(x)
    T, n = x2.shape
    for B, At, thr, _ in (first, second):
        _check("rank_adapter_pair", n, B, At, thr)
    if (first[3] is None) != (second[3] is None):
        raise ValueError("rank_adapter_pair: both units need a bias, or neither")
    if not use_kernels(T, config):
        return tuple(rank_adapter_gemm(x2, *unit).reshape(*lead, unit[1].shape[1]) for unit in (first, second))
    (B1, At1, thr1, bias1), (B2, At2, thr2, bias2) = first, second
    rc, gc = config if config is not None else rank_adapter_configs(n, *At1.shape, T)
    tiles1 = triton.cdiv(At1.shape[1], gc.block_n)
    zpart, tickets = _router(x2, [B1, B2], rc, tiles1 + triton.cdiv(At2.shape[1], gc.block_n), frozen_weights)
    y1, y2 = masked_gemv_pair(zpart, PROLOGUE_RANK, (thr1, At1, bias1), (thr2, At2, bias2), x.dtype, gc,
                              rank1=B1.shape[0], in_splits=zpart.shape[0], tickets=(tickets, tickets[tiles1:]))
    return y1.reshape(*lead, -1), y2.reshape(*lead, -1)
