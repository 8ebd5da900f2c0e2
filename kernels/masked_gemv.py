"""Masked transposed GEMV for decode: the second step of the rank adapter and the whole neuron adapter.

One kernel computes ``y = (keep * v) @ W + bias`` for 1-8 tokens, where ``W: [K, M]`` is stored
row-major with one maskable entry per row (a rank of ``At``, or an input of ``Wt``), so a dropped
entry skips a contiguous row and its bytes are never read::

    for each program (output tile m, split s):                         # grid (M / BM, S)
        acc[T, BM] = 0                                                 # fp32
        v = masked input of chunk s                                    # PROLOGUE below, fp32, 0 where dropped
        for chunk c = s, s + S, s + 2S, ... < K / BK:                  # strided: masks thin out along K
            row[BK]   = any over tokens of v != 0                      # union of the kept rows
            w[BK, BM] = load W[c, m] where row                         # dropped rows are never read
            v_next    = masked input of chunk c + S                    # requested while w is in flight
            acc      += sum over BK of v[:, :, None] * w[None]         # fp32 multiply-add
            v         = v_next
        S == 1:  y[:, m] = acc + bias                                  # cast to y's dtype
        else:    partials[s, :, m] = acc
                 ticket = atomic_add(tickets[m], 1)                    # after every warp's stores
                 if ticket == S - 1:                                   # the last program of tile m
                     y[:, m] = sum_s partials[s, :, m] + bias          # fixed order: deterministic
                     tickets[m] = 0                                    # zeroed for the next call

With ``GROUPED`` one launch runs the GEMVs of two units that read one input: two rank adapters
(gate and up of a gated MLP, whose router partials one router launch wrote side by side) or two
neuron adapters (both read ``x``): the second unit's output tiles follow the first's in the grid,
and each program picks its unit's W, thresholds, bias, output, tickets and offsets once, at its start.

The last program of an output tile sums the partials, so no second launch is needed; the sum runs
in a fixed order whichever program comes last, so results are bit-reproducible, and ``tickets``
(int32, one per output tile) must be zero when the kernel starts and are zero again when it ends
(the launchers zero them in the launch before: the router, or a fill). With ``FUSED_SUM`` off the
kernel only writes the partials and ``split_sum_kernel`` sums them in a second launch.

One token takes a 1-D path (``v [BK]``, ``acc [BM]``), as in TEAL's kernel; the weights are loaded
``evict_first`` (read once), the small inputs ``evict_last``. A tile is a few warps' worth of loads:
many short programs keep enough bytes in flight, which the split count sets (configs.py). With
``PREFETCH`` the loop is as drawn; without it each chunk's masked input is loaded at the top of its
own iteration (fewer registers).

Prologues (``PROLOGUE``):

- ``RANK``: ``v = sum_j zpart[j, t, c]``, the router's split-K partials of ``z = B x``
  (rank_adapter.py), summed in a fixed order, so the mask is computed here, in the load stage.
- ``NEURON``: ``v = x[t, c]``.
- ``GATED``: ``v = act(gate[t, c]) * up[t, c]``, rounded like the torch reference (the activation
  and the product each rounded to the input dtype): the middle of a gated MLP, fused.

A token that did not keep a row of the union contributes exact zeros, so each token gets its own
per-token result. No atomic touches a result (only the int32 tickets), and no bf16 atomic add is
needed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ranapass.kernels.capabilities import triton_interpret
from ranapass.kernels.configs import KernelConfig
from ranapass.kernels.launch import launch, pdl_launch, use_pdl
from ranapass.kernels.primitives import cast, launch_dependents, wait_for_prior_grid

__all__ = ["masked_gemv", "masked_gemv_pair", "masked_gemv_kernel", "split_sum_kernel", "PROLOGUE_RANK",
           "PROLOGUE_NEURON", "PROLOGUE_GATED"]

PROLOGUE_RANK = 0
PROLOGUE_NEURON = 1
PROLOGUE_GATED = 2


@triton.jit
def _gated(gate, up, ACTIVATION: tl.constexpr, IN_DTYPE: tl.constexpr, INTERPRETER: tl.constexpr):
    """``act(gate) * up`` in fp32, rounded to ``IN_DTYPE`` after each step like torch's eager ops.

    ``ACTIVATION`` is a code of the table in activations.py, whose torch functions this must equal."""
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
def _prologue(a_ptr, b_ptr, thr_ptr, offs_t, t_ok, offs_k, k_ok, stride_at, stride_ap, stride_bt,
              IN_SPLITS: tl.constexpr, PROLOGUE: tl.constexpr, ACTIVATION: tl.constexpr, ONE_TOKEN: tl.constexpr,
              INTERPRETER: tl.constexpr):
    """One chunk of the masked input, fp32 with dropped entries 0: ``v [BLOCK_K]`` for one token
    (``ONE_TOKEN``: plain vectors, which the compiler loads in the weight tile's row layout or moves
    there through shared memory, depending on the tile), else ``v [BLOCK_T, BLOCK_K]``."""
    if ONE_TOKEN:
        offs = offs_k
        ok = k_ok
    else:
        offs = offs_t[:, None] * stride_at + offs_k[None, :]
        ok = t_ok[:, None] & k_ok[None, :]
    if PROLOGUE == 0:  # RANK: z = sum of the router's partials, fixed order
        v = tl.load(a_ptr + offs, mask=ok, other=0.0, eviction_policy="evict_last")
        for j in tl.static_range(1, IN_SPLITS):
            v += tl.load(a_ptr + j * stride_ap + offs, mask=ok, other=0.0, eviction_policy="evict_last")
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
def _tile(offs_t, t_ok, offs_m, m_ok, M, BLOCK_T: tl.constexpr):
    """Offsets into a ``[T, M]`` tensor of this program's output tile, and their mask."""
    if BLOCK_T == 1:
        offs = offs_m
        ok = m_ok
    else:
        offs = offs_t[:, None] * M + offs_m[None, :]
        ok = t_ok[:, None] & m_ok[None, :]
    return offs, ok


@triton.jit
def _store_output(acc, bias_ptr, y_ptr, offs, ok, offs_m, m_ok, HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr,
                  INTERPRETER: tl.constexpr):
    """``y = acc + bias``, cast to y's dtype (bias added in fp32, after the sum, like split_sum_kernel)."""
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_m, mask=m_ok, other=0.0).to(tl.float32)
        if BLOCK_T == 1:
            acc += bias
        else:
            acc += bias[None, :]
    tl.store(y_ptr + offs, cast(acc, y_ptr.dtype.element_ty, INTERPRETER), mask=ok)


@triton.jit
def _sum_partials(part_ptr, offs, ok, n_splits, TM, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr,
                  BLOCK_M: tl.constexpr):
    """``sum_s partials[s]`` over this tile, ``BLOCK_S`` splits per load, in a fixed order.

    The partials come from other programs: loaded ``.cg`` (from L2, where their stores landed).
    """
    if BLOCK_T == 1:
        total = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for s0 in range(0, n_splits, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            p = tl.load(part_ptr + offs_s[:, None] * TM + offs[None, :],
                        mask=(offs_s[:, None] < n_splits) & ok[None, :], other=0.0, cache_modifier=".cg")
            total += tl.sum(p, axis=0)
    else:
        total = tl.zeros((BLOCK_T, BLOCK_M), dtype=tl.float32)
        for s0 in range(0, n_splits, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            p = tl.load(part_ptr + offs_s[:, None, None] * TM + offs[None, :, :],
                        mask=(offs_s[:, None, None] < n_splits) & ok[None, :, :], other=0.0, cache_modifier=".cg")
            total += tl.sum(p, axis=0)
    return total


@triton.jit
def masked_gemv_kernel(
    # pointers
    a_ptr, b_ptr, thr_ptr,          # prologue inputs (RANK: zpart, -; NEURON: x, -; GATED: gate, up)
    w_ptr, bias_ptr,                # W [K, M] row-major; bias [M] (read only if HAS_BIAS)
    part_ptr, ticket_ptr, y_ptr,    # partials [S, T, M] fp32; tickets [output tiles] int32, zero; y [T, M]
    thr2_ptr, w2_ptr, bias2_ptr, y2_ptr, ticket2_ptr,  # GROUPED: the second unit's thresholds, W, bias, y, tickets
    # sizes
    T, K, M,
    # strides (the last dimension of every tensor is contiguous)
    stride_at, stride_ap, stride_bt,  # prologue inputs: token stride (a, b); RANK: partial stride of a
    stride_wk,
    # GROUPED: the second unit (its tiles follow the first unit's TILES1 tiles)
    K2, M2, stride_wk2, TILES1,
    A2_OFF, PART2_OFF,              # where its masked input starts in a (RANK: at rank R1; NEURON: 0), its partials
    # meta-parameters
    IN_SPLITS: tl.constexpr,        # RANK: number of router partials to sum
    PROLOGUE: tl.constexpr, ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr,
    FUSED_SUM: tl.constexpr,        # the last program of a tile writes y (else: partials only, split_sum_kernel)
    PREFETCH: tl.constexpr,         # request the next chunk's masked input before this chunk's multiply-add
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_S: tl.constexpr,          # splits summed per load by the last program
    GROUPED: tl.constexpr,          # two units in one launch (two rank or two neuron adapters on one input)
    PDL: tl.constexpr,              # launched with programmatic dependent launch (primitives.py)
    INTERPRETER: tl.constexpr,
):
    # ---------------------------------------------------------------- wait for the kernel before
    launch_dependents(PDL)          # the next kernel may launch now (it waits for this one)
    wait_for_prior_grid(PDL)        # the inputs (router partials, x) and the tickets are ready
    # ---------------------------------------------------------------- program -> unit and tiles
    tile = tl.program_id(0)         # the output tile (tiles of both units, when GROUPED)
    pid_m = tile                    # the tile within its unit, and the index of its ticket
    if GROUPED:  # a program of the second unit switches every per-unit argument
        second = tile >= TILES1
        pid_m = tl.where(second, tile - TILES1, tile)
        K = tl.where(second, K2, K)
        M = tl.where(second, M2, M)
        stride_wk = tl.where(second, stride_wk2, stride_wk)
        if second:
            thr_ptr = thr2_ptr
            w_ptr = w2_ptr
            bias_ptr = bias2_ptr
            y_ptr = y2_ptr
            ticket_ptr = ticket2_ptr
            a_ptr += A2_OFF
            part_ptr += PART2_OFF
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
    if PREFETCH:  # the first chunk's masked input; the loop requests each next one early
        offs_k = pid_s * BLOCK_K + tl.arange(0, BLOCK_K)
        v = _prologue(a_ptr, b_ptr, thr_ptr, offs_t, t_ok, offs_k, offs_k < K, stride_at, stride_ap, stride_bt,
                      IN_SPLITS, PROLOGUE, ACTIVATION, BLOCK_T == 1, INTERPRETER)
    for c in range(pid_s, tl.cdiv(K, BLOCK_K), n_splits):
        offs_k = c * BLOCK_K + tl.arange(0, BLOCK_K)
        if not PREFETCH:
            v = _prologue(a_ptr, b_ptr, thr_ptr, offs_t, t_ok, offs_k, offs_k < K, stride_at, stride_ap,
                          stride_bt, IN_SPLITS, PROLOGUE, ACTIVATION, BLOCK_T == 1, INTERPRETER)
        if BLOCK_T == 1:
            row = v != 0.0
        else:  # union over the tokens: a row that no token kept is never loaded
            row = tl.max((v != 0.0).to(tl.int32), axis=0) > 0
        # weights stream through once: evict them first, keep the small inputs in cache
        w = tl.load(w_cols + offs_k[:, None] * stride_wk, mask=row[:, None] & m_ok[None, :], other=0.0,
                    eviction_policy="evict_first").to(tl.float32)
        if PREFETCH:  # the next chunk's masked input, requested while this chunk's rows are in flight
            offs_next = offs_k + n_splits * BLOCK_K
            v_next = _prologue(a_ptr, b_ptr, thr_ptr, offs_t, t_ok, offs_next, offs_next < K, stride_at, stride_ap,
                               stride_bt, IN_SPLITS, PROLOGUE, ACTIVATION, BLOCK_T == 1, INTERPRETER)
        if BLOCK_T == 1:
            acc += tl.sum(w * v[:, None], axis=0)
        else:
            acc += tl.sum(v[:, :, None] * w[None, :, :], axis=1)
        if PREFETCH:
            v = v_next

    # ---------------------------------------------------------------- epilogue
    offs, ok = _tile(offs_t, t_ok, offs_m, m_ok, M, BLOCK_T)
    TM = T * M
    if not FUSED_SUM:
        tl.store(part_ptr + pid_s * TM + offs, acc, mask=ok)
    elif n_splits == 1:
        _store_output(acc, bias_ptr, y_ptr, offs, ok, offs_m, m_ok, HAS_BIAS, BLOCK_T, INTERPRETER)
    else:
        tl.store(part_ptr + pid_s * TM + offs, acc, mask=ok)
        tl.debug_barrier()  # every warp's partial is stored before the ticket publishes them (release)
        ticket = tl.atomic_add(ticket_ptr + pid_m, 1, sem="acq_rel", scope="gpu")
        if ticket == n_splits - 1:  # the last program of this tile: every partial is visible (acquire)
            total = _sum_partials(part_ptr, offs, ok, n_splits, TM, BLOCK_S, BLOCK_T, BLOCK_M)
            _store_output(total, bias_ptr, y_ptr, offs, ok, offs_m, m_ok, HAS_BIAS, BLOCK_T, INTERPRETER)
            tl.store(ticket_ptr + pid_m, 0)


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
    tickets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch ``masked_gemv_kernel`` (and ``split_sum_kernel`` unless ``cfg.fused_sum``); returns ``y: [T, m]``.

    ``a`` is the prologue's first input, ``[T, K]`` (RANK: the router partials ``[in_splits, T, K]``),
    ``b`` the GATED prologue's ``up`` (``[T, K]``) or None. ``tickets``: int32, at least one zero per
    output tile (``cdiv(m, cfg.block_n)``), zeroed by an earlier launch (the router) or left zero by
    this kernel's last call (a persistent buffer); None: a fill here.
    """
    stride_ap = a.stride(0) if prologue == PROLOGUE_RANK else 0
    (y,) = _launch(a, b, stride_ap, 0, [(thresholds, W, bias)], out_dtype, cfg, prologue, activation, in_splits,
                   None if tickets is None else (tickets,))
    return y


def masked_gemv_pair(
    a: torch.Tensor,
    prologue: int,
    first: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    second: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    out_dtype: torch.dtype,
    cfg: KernelConfig,
    rank1: int = 0,
    in_splits: int = 1,
    tickets: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The masked GEMVs of two units that read one input, in one launch; returns ``(y1, y2)``.

    RANK: ``a`` is one router's partials of both units, ``[in_splits, T, R1 + R2]`` with the first
    unit's ``rank1`` ranks first. NEURON: ``a`` is the shared input ``[T, n]``. ``first``, ``second``:
    each unit's ``(thresholds, W, bias)``; both biases or neither. ``tickets``: each unit's, at least
    one zero per output tile, or None (a fill here).
    """
    if prologue not in (PROLOGUE_RANK, PROLOGUE_NEURON):
        raise ValueError(f"masked_gemv_pair: prologue {prologue} has no pair form (RANK or NEURON)")
    stride_ap = a.stride(0) if prologue == PROLOGUE_RANK else 0
    return _launch(a, None, stride_ap, rank1, [first, second], out_dtype, cfg, prologue, 0, in_splits, tickets)


def _launch(a, b, stride_ap, a2_off, units, out_dtype, cfg, prologue, activation, in_splits, tickets):
    """Launch the kernel for one unit or two (``GROUPED``): every unit's programs in one grid.

    ``tickets``: one buffer per unit, or None (zeroed buffers here)."""
    if len({bias is None for _, _, bias in units}) > 1:
        raise ValueError("masked_gemv_pair: both units need a bias, or neither")
    T = a.shape[-2]
    device = units[0][1].device
    splits = min(cfg.splits, max(triton.cdiv(W.shape[0], cfg.block_k) for _, W, _ in units))
    tiles = [triton.cdiv(W.shape[1], cfg.block_n) for _, W, _ in units]
    fused = cfg.fused_sum or splits == 1
    if tickets is None:
        fill = torch.zeros if fused and splits > 1 else torch.empty
        tickets = [fill(n, device=device, dtype=torch.int32) for n in tiles]
    for t, n in zip(tickets, tiles):
        if t.dtype != torch.int32 or t.numel() < n or t.device != device:
            raise ValueError(f"masked_gemv: tickets must be int32 on {device} with at least {n} entries (one per "
                             f"output tile), got {t.dtype} [{t.numel()}] on {t.device}")
    widths = [W.shape[1] for _, W, _ in units]
    part = torch.empty(splits * T * sum(widths), device=device, dtype=torch.float32)  # unit after unit: [S, T, m]
    ys = [torch.empty((T, m), device=device, dtype=out_dtype) for m in widths]
    (thr1, W1, bias1), (thr2, W2, bias2) = units[0], units[-1]
    y1, y2 = ys[0], ys[-1]
    b = a if b is None else b
    block_t = triton.next_power_of_2(T)
    # the last program sums BLOCK_S splits per load: all of them in one load where that is at most 64 fp32
    # values per thread (each further load is one more round trip to L2 at the very end of the kernel)
    block_s = max(1, min(triton.next_power_of_2(splits), 2048 * cfg.num_warps // (block_t * cfg.block_n)))
    pdl = use_pdl(device)
    launch(masked_gemv_kernel)[(sum(tiles), splits)](
        a, b, thr1, W1, y1 if bias1 is None else bias1, part, tickets[0], y1,
        thr2, W2, y2 if bias2 is None else bias2, y2, tickets[-1],
        T, W1.shape[0], W1.shape[1], a.stride(-2), stride_ap, b.stride(-2), W1.stride(0),
        W2.shape[0], W2.shape[1], W2.stride(0), tiles[0], a2_off, splits * T * widths[0],
        IN_SPLITS=in_splits, PROLOGUE=prologue, ACTIVATION=activation, HAS_BIAS=bias1 is not None, FUSED_SUM=fused,
        PREFETCH=cfg.prefetch, BLOCK_T=block_t, BLOCK_K=cfg.block_k, BLOCK_M=cfg.block_n, BLOCK_S=block_s,
        GROUPED=len(units) == 2, PDL=pdl, INTERPRETER=triton_interpret(), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, **pdl_launch(pdl))
    if not fused:
        start = 0
        for (_, _, bias), y, m in zip(units, ys, widths):
            _split_sum(part[start:start + splits * T * m], bias, y, splits)
            start += splits * T * m
    return tuple(ys)


def _split_sum(part: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor, splits: int) -> None:
    """``y = sum_s part[s] + bias`` in a second launch (``part``: ``[splits, T, m]`` flat)."""
    T, m = y.shape
    block_s = triton.next_power_of_2(splits)
    block = max(32, min(256, 8192 // block_s))
    launch(split_sum_kernel)[(triton.cdiv(T * m, block),)](
        part, part if bias is None else bias, y, T * m, m,
        SPLITS=splits, HAS_BIAS=bias is not None, BLOCK_S=block_s, BLOCK=block, INTERPRETER=triton_interpret(),
        num_warps=4)
