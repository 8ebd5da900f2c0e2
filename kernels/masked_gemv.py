"""Masked transposed GEMV/GEMM: the second step of the rank adapter and the whole neuron adapter.

One kernel computes ``y = (keep * v) @ W`` where ``W: [K, M]`` is stored row-major with one maskable
entry per row (a rank of ``At``, or an input of ``Wt``), so a dropped entry skips a contiguous row::

    for each program (token tile t, output tile m, split s):          # grid (T/BT, M/BM, S)
        acc[BT, BM] = 0                                                # fp32
        for chunk c = s, s + S, s + 2S, ... < K / BK:                  # strided: masks thin out along K
            v[BT, BK]  = prologue(c)                                   # see PROLOGUE below, fp32
            keep       = |v| >= thresholds[c]                          # per token
            v          = where(keep, v, 0)
            row[BK]    = any over the token tile of v != 0             # union of kept rows
            w[BK, BM]  = load W[c, m] where row                        # dropped rows are never read
            acc       += v @ w       # MMA, v in W's dtype (RANK: z = hi + lo, ~fp32); 1-token tiles: fp32 FMA
        if S == 1: y[t, m] = (acc + bias).to(y.dtype)
        else:      partials[s, t, m] = acc                             # summed by split_sum_kernel

Prologues (``PROLOGUE``):

- ``RANK``: ``v = sum_j zpart[j, t, c]``, the router's split-K partials of ``z = B x``
  (rank_adapter.py), summed in a fixed order, so the mask is computed here, in the load stage.
- ``NEURON``: ``v = x[t, c]``.
- ``GATED``: ``v = act(gate[t, c]) * up[t, c]``, rounded like the torch reference (the activation
  and the product each rounded to the input dtype), the fused middle of a gated MLP.

A token outside the tile's kept set contributes exact zeros, so a union load gives each token its own
per-token result (batch > 1 decode and prefill use the same code). Splitting K writes fp32 partials
and a second, tiny kernel sums them in a fixed order: deterministic, no atomics, no zero-filled buffer,
and bf16 needs no atomic add.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ranapass.capabilities import triton_interpret
from ranapass.kernels.configs import KernelConfig
from ranapass.kernels.launch import dot_precision, launch
from ranapass.kernels.primitives import cast, dot_acc

__all__ = ["masked_gemv", "masked_gemv_kernel", "split_sum_kernel",  "PROLOGUE_RANK", "PROLOGUE_NEURON", "PROLOGUE_GATED",
           "ACTIVATIONS"]

PROLOGUE_RANK = 0
PROLOGUE_NEURON = 1
PROLOGUE_GATED = 2

ACTIVATIONS = {"silu": 0, "gelu_tanh": 1, "gelu": 2}
"""Gated activations the GATED prologue knows, as constexpr codes."""


@triton.jit
def _gated(gate, up, ACTIVATION: tl.constexpr, IN_DTYPE: tl.constexpr, INTERPRETER: tl.constexpr):
    """``act(gate) * up`` in fp32, rounded to ``IN_DTYPE`` after each step like torch's eager ops."""
    g = gate.to(tl.float32)
    if ACTIVATION == 0:  # silu
        a = g / (1.0 + tl.exp(-g))
    elif ACTIVATION == 1:  # gelu, tanh approximation; tanh(u) = 2 sigmoid(2u) - 1
        u = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        a = 0.5 * g * (2.0 / (1.0 + tl.exp(-2.0 * u)))
    else:  # gelu, erf form
        a = 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
    a = cast(a, IN_DTYPE, INTERPRETER).to(tl.float32)
    return cast(a * up.to(tl.float32), IN_DTYPE, INTERPRETER).to(tl.float32)


@triton.jit
def masked_gemv_kernel(
    # pointers
    a_ptr, b_ptr, thr_ptr,          # prologue inputs (RANK: zpart, -; NEURON: x, -; GATED: gate, up)
    w_ptr, bias_ptr, out_ptr,       # W [K, M] row-major; bias [M]; y [T, M] or partials [S, T, M] fp32
    # sizes
    T, K, M,
    # strides (the last dimension of every tensor is contiguous)
    stride_at, stride_bt,           # token stride of the prologue inputs (RANK: K, partials [IN_SPLITS, T, K])
    stride_wk, stride_yt,
    # meta-parameters
    IN_SPLITS: tl.constexpr,        # RANK: number of router partials to sum
    PROLOGUE: tl.constexpr, ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_OUT: tl.constexpr,
    SPLIT_V: tl.constexpr,          # multiply v as bf16/fp16 hi + lo parts (RANK: z is fp32)
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr,
):
    # ---------------------------------------------------------------- program -> tiles
    # Token tiles vary fastest, so programs that run together share one W tile (read once from DRAM).
    pid_t = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    n_splits = tl.num_programs(2)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    t_ok = offs_t < T
    m_ok = offs_m < M

    # ---------------------------------------------------------------- masked reduction over K
    acc = tl.zeros((BLOCK_T, BLOCK_M), dtype=tl.float32)
    for c in range(pid_s, tl.cdiv(K, BLOCK_K), n_splits):
        offs_k = c * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        tk_ok = t_ok[:, None] & k_ok[None, :]
        if PROLOGUE == 0:  # RANK: z = sum of the router's partials, fixed order
            v = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
            for j in tl.static_range(IN_SPLITS):
                v += tl.load(a_ptr + j * T * K + offs_t[:, None] * stride_at + offs_k[None, :], mask=tk_ok, other=0.0)
        elif PROLOGUE == 1:  # NEURON
            v = tl.load(a_ptr + offs_t[:, None] * stride_at + offs_k[None, :], mask=tk_ok, other=0.0).to(tl.float32)
        else:  # GATED
            gate = tl.load(a_ptr + offs_t[:, None] * stride_at + offs_k[None, :], mask=tk_ok, other=0.0)
            up = tl.load(b_ptr + offs_t[:, None] * stride_bt + offs_k[None, :], mask=tk_ok, other=0.0)
            v = _gated(gate, up, ACTIVATION, a_ptr.dtype.element_ty, INTERPRETER)
        thr = tl.load(thr_ptr + offs_k, mask=k_ok, other=float("inf"))
        v = tl.where(tl.abs(v) >= thr[None, :], v, 0.0)
        # union over the token tile: a row that no token kept is never loaded
        row = tl.sum((v != 0.0).to(tl.int32), axis=0) > 0
        w = tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_m[None, :], mask=row[:, None] & m_ok[None, :],
                    other=0.0)
        if BLOCK_T == 1:  # one token: a plain fp32 multiply-add over the rows, no MMA
            acc += tl.sum(tl.reshape(v, (BLOCK_K, 1)) * w.to(tl.float32), axis=0)[None, :]
        else:
            v_hi = cast(v, w.dtype, INTERPRETER)
            acc = dot_acc(acc, v_hi, w, DOT_PRECISION, INTERPRETER)
            if SPLIT_V:  # z is fp32: add what rounding it to W's dtype lost (a second, cheap MMA)
                acc = dot_acc(acc, cast(v - v_hi.to(tl.float32), w.dtype, INTERPRETER), w, DOT_PRECISION,
                              INTERPRETER)

    # ---------------------------------------------------------------- epilogue
    tm_ok = t_ok[:, None] & m_ok[None, :]
    if SPLIT_OUT:
        tl.store(out_ptr + pid_s * T * M + offs_t[:, None] * M + offs_m[None, :], acc, mask=tm_ok)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_m, mask=m_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_t[:, None] * stride_yt + offs_m[None, :], cast(acc, out_ptr.dtype.element_ty, INTERPRETER),
                 mask=tm_ok)


@triton.jit
def split_sum_kernel(
    part_ptr, bias_ptr, out_ptr,    # partials [S, T, M] fp32; bias [M]; y [T, M] contiguous
    TM, M,
    SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    """``y = sum_s partials[s] + bias``: all splits loaded at once, summed in a fixed order."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_s = tl.arange(0, BLOCK_S)
    ok = offs < TM
    part = tl.load(part_ptr + offs_s[:, None] * TM + offs[None, :], mask=(offs_s[:, None] < SPLITS) & ok[None, :],
                   other=0.0)
    acc = tl.sum(part, axis=0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % M, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, cast(acc, out_ptr.dtype.element_ty, INTERPRETER), mask=ok)

def masked_gemv(
    a: torch.Tensor,
    b: torch.Tensor | None,
    thresholds: torch.Tensor,
    W: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    cfg: KernelConfig,
    prologue: int,
    activation: int = 0,
    in_splits: int = 1,
) -> torch.Tensor:
    """Launch ``masked_gemv_kernel`` (and ``split_sum_kernel`` when K is split); returns ``y: [T, m]``.

    ``a`` is the prologue's first input, ``[T, K]`` (RANK: the router partials ``[in_splits, T, K]``),
    ``b`` the GATED prologue's ``up`` (``[T, K]``) or None.
    """
    K, m = W.shape
    T = a.shape[-2]
    splits = min(cfg.splits, triton.cdiv(K, cfg.block_k))
    y = torch.empty((T, m), device=W.device, dtype=out_dtype)
    out = y if splits == 1 else torch.empty((splits, T, m), device=W.device, dtype=torch.float32)
    b = a if b is None else b
    grid = (triton.cdiv(T, cfg.block_t), triton.cdiv(m, cfg.block_n), splits)
    launch(masked_gemv_kernel)[grid](
        a, b, thresholds, W, W if bias is None else bias, out,
        T, K, m, a.stride(-2), b.stride(-2), W.stride(0), m,
        IN_SPLITS=in_splits, PROLOGUE=prologue, ACTIVATION=activation, HAS_BIAS=bias is not None, SPLIT_OUT=splits > 1,
        SPLIT_V=prologue == PROLOGUE_RANK and W.dtype != torch.float32,
        BLOCK_T=cfg.block_t, BLOCK_K=cfg.block_k, BLOCK_M=cfg.block_n, DOT_PRECISION=dot_precision(W.dtype),
        INTERPRETER=triton_interpret(), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if splits > 1:
        block_s = triton.next_power_of_2(splits)
        block = max(32, min(256, 8192 // block_s))
        launch(split_sum_kernel)[(triton.cdiv(T * m, block),)](
            out, out if bias is None else bias, y, T * m, m,
            SPLITS=splits, HAS_BIAS=bias is not None, BLOCK_S=block_s, BLOCK=block, INTERPRETER=triton_interpret(),
            num_warps=4)
    return y
