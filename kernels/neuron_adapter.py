"""Neuron adapter ``y = (keep * x) Wt + bias``, ``keep = |x| >= thresholds``, its pair and gated-MLP forms.

Decode: one masked GEMV over ``Wt: [n, m]`` (input-major), mask computed in its load stage
(masked_gemv.py, NEURON prologue), then the split sum. Two neuron adapters that read one input
(q and k, gate and up) run as a pair: one launch holds both units' tiles, each with its own
thresholds, so the pair costs the bytes of both and the fixed latency of one. The gated form takes the gate and up
projections of a gated MLP and computes ``h = act(gate) * up`` and its mask in the same load stage
(GATED prologue): the middle of the MLP is no chain of tiny launches and ``h`` never goes to memory.
Prefill runs cuBLAS with the same mask (masked_gemm.py).

The split sum's tile tickets (masked_gemv.py) must be zero when the kernel starts and are zero
again when it ends, so a caller that runs the adapter again and again passes one persistent
buffer (``ticket_buffer``; the bound adapters do): no fill launch per call, and with programmatic
dependent launch nothing stands between this kernel and the one before. Without one, each call
fills its own.
"""

from __future__ import annotations

import torch
import triton

from ranapass.kernels.configs import MIN_BLOCK, KernelConfig, masked_gemv_config, use_kernels
from ranapass.kernels.launch import flatten_tokens
from ranapass.kernels.activations import lookup
from ranapass.kernels.masked_gemv import PROLOGUE_GATED, PROLOGUE_NEURON, masked_gemv, masked_gemv_pair
from ranapass.kernels.masked_gemm import gated_neuron_adapter_gemm, neuron_adapter_gemm

__all__ = ["neuron_adapter", "neuron_adapter_pair", "gated_neuron_adapter", "ticket_buffer"]


def ticket_buffer(m: int, device: torch.device | str) -> torch.Tensor:
    """Zeroed int32 tickets for a neuron adapter with ``m`` outputs, enough for any decode config.

    The kernels leave them zero. One buffer serves one adapter on one stream: two launches that use
    it at the same time (two streams) would mix their counts. The ops declare it mutated, so under
    CUDA graphs it must be a static input: the backend registers it as a buffer of the compiled graph;
    a hand-written compiled function marks it (``torch._dynamo.mark_static_address``).
    """
    return torch.zeros(triton.cdiv(m, MIN_BLOCK), device=device, dtype=torch.int32)


def _check(name: str, n: int, Wt: torch.Tensor, thresholds: torch.Tensor) -> None:
    if Wt.shape[0] != n or thresholds.shape != (n,):
        raise ValueError(f"{name}: input width {n}, Wt {tuple(Wt.shape)} and thresholds {tuple(thresholds.shape)} "
                         "do not agree (want Wt [n, m], thresholds [n])")
    if Wt.stride(-1) != 1:
        raise ValueError(f"{name}: Wt must have a contiguous last dimension")


def neuron_adapter(
    x: torch.Tensor,
    Wt: torch.Tensor,
    thresholds: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: KernelConfig | None = None,
    tickets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the neuron adapter on ``x: [..., n]``; returns ``[..., m]`` in ``x.dtype``.

    Args:
        x: input, any leading dims.
        Wt: ``[n, m]``, W transposed (a dropped input skips one contiguous row).
        thresholds: ``[n]`` float32.
        bias: ``[m]`` or None.
        config: decode tiles; default from ``configs.masked_gemv_config``.
        tickets: a ``ticket_buffer(m)`` kept across calls, or None (a fill per call).
    """
    x2, lead = flatten_tokens(x)
    T, n = x2.shape
    _check("neuron_adapter", n, Wt, thresholds)
    m = Wt.shape[1]
    if not use_kernels(T, config):
        return neuron_adapter_gemm(x2, Wt, thresholds, bias).reshape(*lead, m)
    cfg = config if config is not None else masked_gemv_config(n, m, T)
    y = masked_gemv(x2, None, thresholds, Wt, bias, x.dtype, cfg, PROLOGUE_NEURON, tickets=tickets)
    return y.reshape(*lead, m)


def neuron_adapter_pair(
    x: torch.Tensor,
    first: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    second: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    config: KernelConfig | None = None,
    tickets: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two neuron adapters on one input ``x: [..., n]`` in one launch; returns both outputs.

    Each of ``first`` and ``second`` is ``(Wt, thresholds, bias)`` as in ``neuron_adapter``; both biases
    or neither. The tiles are the first unit's (``configs.masked_gemv_config``). ``tickets``: each unit's
    ``ticket_buffer``, or None (fills per call). More tokens than the kernels take run a GEMM per unit.
    """
    x2, lead = flatten_tokens(x)
    T, n = x2.shape
    for Wt, thr, _ in (first, second):
        _check("neuron_adapter_pair", n, Wt, thr)
    if (first[2] is None) != (second[2] is None):
        raise ValueError("neuron_adapter_pair: both units need a bias, or neither")
    if not use_kernels(T, config):
        return tuple(neuron_adapter_gemm(x2, *unit).reshape(*lead, unit[0].shape[1]) for unit in (first, second))
    cfg = config if config is not None else masked_gemv_config(n, first[0].shape[1], T)
    (Wt1, thr1, bias1), (Wt2, thr2, bias2) = first, second
    y1, y2 = masked_gemv_pair(x2, PROLOGUE_NEURON, (thr1, Wt1, bias1), (thr2, Wt2, bias2), x.dtype, cfg,
                              tickets=tickets)
    return y1.reshape(*lead, -1), y2.reshape(*lead, -1)


def gated_neuron_adapter(
    gate: torch.Tensor,
    up: torch.Tensor,
    Wt: torch.Tensor,
    thresholds: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "silu",
    config: KernelConfig | None = None,
    tickets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the neuron adapter on ``h = act(gate) * up`` (``[..., n]`` each); returns ``[..., m]``.

    Args:
        gate, up: the gate and up projections' outputs, same shape and dtype.
        Wt, thresholds, bias, tickets: as in ``neuron_adapter``.
        activation: a name of ``activations.ACTIVATIONS``.
        config: decode tiles; default from ``configs.masked_gemv_config``.
    """
    code = lookup(activation).code
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gated_neuron_adapter: gate {tuple(gate.shape)} {gate.dtype} and up "
                         f"{tuple(up.shape)} {up.dtype} must match")
    g2, lead = flatten_tokens(gate)
    u2, _ = flatten_tokens(up)
    T, n = g2.shape
    _check("gated_neuron_adapter", n, Wt, thresholds)
    m = Wt.shape[1]
    if not use_kernels(T, config):
        return gated_neuron_adapter_gemm(g2, u2, Wt, thresholds, bias, activation).reshape(*lead, m)
    cfg = config if config is not None else masked_gemv_config(n, m, T)
    y = masked_gemv(g2, u2, thresholds, Wt, bias, gate.dtype, cfg, PROLOGUE_GATED, code,
                    tickets=tickets)
    return y.reshape(*lead, m)
