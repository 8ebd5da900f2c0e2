"""Masked transposed GEMV for decode: the second step of the rank adapter and the whole neuron adapter.

One kernel computes ``y = (keep * v) @ W`` for 1-8 tokens, where ``W: [K, M]`` is stored row-major with
one maskable entry per row (a rank of ``At``, or an input of ``Wt``), so a dropped entry skips a
contiguous row and its bytes are never read::

    for each program (output tile m, split s):                         # grid (M / BM, S)
        acc[T, BM] = 0                                                 # fp32
        for chunk c = s, s + S, s + 2S, ... < K / BK:                  # strided: masks thin out along K
            v[T, BK]  = prologue(c)                                    # see PROLOGUE below, fp32
            v         = where(|v| >= thresholds[c], v, 0)              # per-token mask
            row[BK]   = any over tokens of v != 0                      # union of the kept rows
            w[BK, BM] = load W[c, m] where row                         # dropped rows are never read
            acc      += sum over BK of v[:, :, None] * w[None]         # fp32 multiply-add
        partials[s, :, m] = acc
    split_sum_kernel: y = sum_s partials[s] + bias, cast to y's dtype  # fixed order: deterministic

One token takes a 1-D path (``v [BK]``, ``acc [BM]``) whose vectors the compiler lays out along the
weight tile's rows, as in TEAL's kernel; the weights are loaded ``evict_first`` (read once), the
small inputs ``evict_last``. A tile is a few warps' worth of loads: many short programs keep enough
bytes in flight, which the split count sets (configs.py).

Prologues (``PROLOGUE``):

- ``RANK``: ``v = sum_j zpart[j, t, c]``, the router's split-K partials of ``z = B x``
  (rank_adapter.py), summed in a fixed order, so the mask is computed here, in the load stage.
- ``NEURON``: ``v = x[t, c]``.
- ``GATED``: ``v = act(gate[t, c]) * up[t, c]``, rounded like the torch reference (the activation
  and the product each rounded to the input dtype): the middle of a gated MLP, fused.

A token that did not keep a row of the union contributes exact zeros, so each token gets its own
per-token result. Splitting K writes fp32 partials that a second, tiny kernel sums in a fixed order:
deterministic, no atomics, no zero-filled buffer, and no bf16 atomic add is needed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ranapass.capabilities import triton_interpret
from ranapass.kernels.configs import KernelConfig
from ranapass.kernels.launch import launch
from ranapass.kernels.primitives import cast

__all__ = ["masked_gemv", "masked_gemv_kernel", "split_sum_kernel", "PROLOGUE_RANK", "PROLOGUE_NEURON",
           "PROLOGUE_GATED", "ACTIVATIONS"]

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
def _prologue(a_ptr, b_ptr, thr_ptr, offs_t, t_ok, offs_k, k_ok, T, K, stride_at, stride_bt,
              IN_SPLITS: tl.constexpr, PROLOGUE: tl.constexpr, ACTIVATION: tl.constexpr, ONE_TOKEN: tl.constexpr,
              INTERPRETER: tl.constexpr):
    """One chunk of the masked input, fp32 with dropped entries 0: ``v [BLOCK_K]`` for one token
    (``ONE_TOKEN``: plain vectors, so the compiler lays them out along the weight tile's rows with no
    shuffle), else ``v [BLOCK_T, BLOCK_K]``."""
    if ONE_TOKEN:
        offs = offs_k
        ok = k_ok
    else:
        offs = offs_t[:, None] * stride_at + offs_k[None, :]
        ok = t_ok[:, None] & k_ok[None, :]
    if PROLOGUE == 0:  # RANK: z = sum of the router's partials, fixed order
        v = tl.load(a_ptr + offs, mask=ok, other=0.0, eviction_policy="evict_last")
        for j in tl.static_range(1, IN_SPLITS):
            v += tl.load(a_ptr + j * T * K + offs, mask=ok, other=0.0, eviction_policy="evict_last")
    elif PROLOGUE == 1:  # NEURON
        v = tl.load(a_ptr + offs, mask=ok, other=0.0, eviction_policy="evict_last").to(tl.float32)
    else:  # GATED (up has its own token stride)
        gate = tl.load(a_ptr + offs, mask=ok, other=0.0, eviction_policy="evict_last")
        if ONE_TOKEN:
            up = tl.load(b_ptr + offs_k, mask=ok, other=0.0, eviction_policy="evict_last")
        else:
            up = tl.load(b_ptr + offs_t[:, None] * stride_bt + offs_k[None, :], mask=ok, other=0.0,
                         eviction_policy="evict_last")
        v = _gated(gate, up, ACTIVATION, a_ptr.dtype.element_ty, INTERPRETER)
    thr = tl.load(thr_ptr + offs_k, mask=k_ok, other=float("inf"), eviction_policy="evict_last")
    if ONE_TOKEN:  # (one return statement: Triton types every return of a function alike)
        v = tl.where(tl.abs(v) >= thr, v, 0.0)
    else:
        v = tl.where(tl.abs(v) >= thr[None, :], v, 0.0)
    return v


@triton.jit
def masked_gemv_kernel(
    # pointers
    a_ptr, b_ptr, thr_ptr,          # prologue inputs (RANK: zpart, -; NEURON: x, -; GATED: gate, up)
    w_ptr, out_ptr,                 # W [K, M] row-major; partials [S, T, M] fp32
    # sizes
    T, K, M,
    # strides (the last dimension of every tensor is contiguous)
    stride_at, stride_bt,           # token stride of the prologue inputs (RANK: K, partials [IN_SPLITS, T, K])
    stride_wk,
    # meta-parameters
    IN_SPLITS: tl.constexpr,        # RANK: number of router partials to sum
    PROLOGUE: tl.constexpr, ACTIVATION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, INTERPRETER: tl.constexpr,
):
    # ---------------------------------------------------------------- program -> tiles
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_splits = tl.num_programs(1)
    offs_t = tl.arange(0, BLOCK_T)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    t_ok = offs_t < T
    m_ok = offs_m < M
    w_cols = w_ptr + offs_m[None, :]

    # ---------------------------------------------------------------- masked reduction over K
    if BLOCK_T == 1:
        acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_T, BLOCK_M), dtype=tl.float32)
    for c in range(pid_s, tl.cdiv(K, BLOCK_K), n_splits):
        offs_k = c * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        v = _prologue(a_ptr, b_ptr, thr_ptr, offs_t, t_ok, offs_k, k_ok, T, K, stride_at, stride_bt,
                      IN_SPLITS, PROLOGUE, ACTIVATION, BLOCK_T == 1, INTERPRETER)
        if BLOCK_T == 1:
            row = v != 0.0
        else:  # union over the tokens: a row that no token kept is never loaded
            row = tl.max((v != 0.0).to(tl.int32), axis=0) > 0
        # weights stream through once: evict them first, keep the small inputs in cache
        w = tl.load(w_cols + offs_k[:, None] * stride_wk, mask=row[:, None] & m_ok[None, :], other=0.0,
                    eviction_policy="evict_first").to(tl.float32)
        if BLOCK_T == 1:
            acc += tl.sum(w * v[:, None], axis=0)
        else:
            acc += tl.sum(v[:, :, None] * w[None, :, :], axis=1)

    # ---------------------------------------------------------------- this split's partial result
    if BLOCK_T == 1:
        tl.store(out_ptr + pid_s * T * M + offs_m, acc, mask=m_ok)
    else:
        tl.store(out_ptr + pid_s * T * M + offs_t[:, None] * M + offs_m[None, :], acc,
                 mask=t_ok[:, None] & m_ok[None, :])


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
    """Launch ``masked_gemv_kernel`` and ``split_sum_kernel``; returns ``y: [T, m]`` (T <= 8 tokens).

    ``a`` is the prologue's first input, ``[T, K]`` (RANK: the router partials ``[in_splits, T, K]``),
    ``b`` the GATED prologue's ``up`` (``[T, K]``) or None.
    """
    K, m = W.shape
    T = a.shape[-2]
    splits = min(cfg.splits, triton.cdiv(K, cfg.block_k))
    part = torch.empty((splits, T, m), device=W.device, dtype=torch.float32)
    b = a if b is None else b
    launch(masked_gemv_kernel)[(triton.cdiv(m, cfg.block_n), splits)](
        a, b, thresholds, W, part,
        T, K, m, a.stride(-2), b.stride(-2), W.stride(0),
        IN_SPLITS=in_splits, PROLOGUE=prologue, ACTIVATION=activation,
        BLOCK_T=triton.next_power_of_2(T), BLOCK_K=cfg.block_k, BLOCK_M=cfg.block_n, INTERPRETER=triton_interpret(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    y = torch.empty((T, m), device=W.device, dtype=out_dtype)
    block_s = triton.next_power_of_2(splits)
    block = max(32, min(256, 8192 // block_s))
    launch(split_sum_kernel)[(triton.cdiv(T * m, block),)](
        part, part if bias is None else bias, y, T * m, m,
        SPLITS=splits, HAS_BIAS=bias is not None, BLOCK_S=block_s, BLOCK=block, INTERPRETER=triton_interpret(),
        num_warps=4)
    return y
