"""The ``torch.ops.ranapass`` operators that the FX pass emits.

Each op is a ``triton_op``: torch.compile traces its body, so on CUDA Inductor launches the Triton
kernels directly (rank_adapter.py, neuron_adapter.py), and on any other device the body is the torch
reference math, which Inductor's C++ backend compiles. Output shapes never depend on the masks and
the kernels never sync with the host (static shapes, CUDA-graph safe). One decode token runs the
row-skipping kernels with tiles chosen from the weight shapes (configs.py); more tokens (batched
decode, prefill) run cuBLAS GEMMs on the masked inputs (masked_gemm.py).

When Inductor runs a graph under CUDA graphs with programmatic dependent launch on sm_90+
(``launch.launch_opaque``: ``mode="reduce-overhead"`` and ``TORCHINDUCTOR_ENABLE_PDL=1``), a traced
decode call becomes one opaque ``*_decode`` op instead of its kernels: Inductor calls it, it launches
the kernels directly with PDL (kernels/primitives.py), which Inductor's launcher for user kernels
cannot, and the graph replays pay nothing for the Python in between. Their rank routers read ``B``
before the previous kernel ends: ``B`` must be a weight no kernel writes (a graph parameter).
"""

from __future__ import annotations

import torch

from ranapass.kernels import neuron_adapter as _neuron
from ranapass.kernels import rank_adapter as _rank
from ranapass.kernels.configs import use_kernels
from ranapass.kernels.launch import direct_launch, launch_opaque
from ranapass.kernels.reference import gated_activation, neuron_adapter_reference, rank_adapter_reference

__all__ = ["rank_adapter", "rank_adapter_pair", "neuron_adapter", "neuron_adapter_pair", "gated_neuron_adapter"]


def _opaque(x: torch.Tensor) -> bool:
    """Is this traced call a decode call that should become its opaque ``*_decode`` op?"""
    return use_kernels(x.numel() // max(1, x.shape[-1]), None) and launch_opaque(x.device)


@torch.library.triton_op("ranapass::rank_adapter", mutates_args=())
def rank_adapter(
    x: torch.Tensor,
    B: torch.Tensor,
    At: torch.Tensor,
    thresholds: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``y = At^T (keep * B x) + bias`` with ``keep = |B x| >= thresholds``; see kernels/reference.py."""
    if x.device.type != "cuda":
        return rank_adapter_reference(x, B, At, thresholds, bias)
    if _opaque(x):
        return rank_adapter_decode(x, B, At, thresholds, bias)
    return _rank.rank_adapter(x, B, At, thresholds, bias)


@torch.library.triton_op("ranapass::rank_adapter_pair", mutates_args=())
def rank_adapter_pair(
    x: torch.Tensor,
    B1: torch.Tensor,
    At1: torch.Tensor,
    thresholds1: torch.Tensor,
    bias1: torch.Tensor | None,
    B2: torch.Tensor,
    At2: torch.Tensor,
    thresholds2: torch.Tensor,
    bias2: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rank adapters on one input (gate and up of a gated MLP): ``rank_adapter`` of each, in shared launches."""
    first, second = (B1, At1, thresholds1, bias1), (B2, At2, thresholds2, bias2)
    if x.device.type != "cuda":
        return rank_adapter_reference(x, *first), rank_adapter_reference(x, *second)
    if _opaque(x):
        return rank_adapter_pair_decode(x, *first, *second)
    return _rank.rank_adapter_pair(x, first, second)


@torch.library.triton_op("ranapass::neuron_adapter", mutates_args={"tickets"})
def neuron_adapter(
    x: torch.Tensor,
    Wt: torch.Tensor,
    thresholds: torch.Tensor,
    bias: torch.Tensor | None,
    tickets: torch.Tensor | None,
) -> torch.Tensor:
    """``y = (keep * x) Wt + bias`` with ``keep = |x| >= thresholds``; see kernels/reference.py.

    ``tickets``: the decode kernel's persistent workspace (``neuron_adapter.ticket_buffer``), zero
    before and after each call, or None.
    """
    if x.device.type != "cuda":
        return neuron_adapter_reference(x, Wt, thresholds, bias)
    if _opaque(x):
        return neuron_adapter_decode(x, Wt, thresholds, bias, tickets)
    return _neuron.neuron_adapter(x, Wt, thresholds, bias, tickets=tickets)


@torch.library.triton_op("ranapass::neuron_adapter_pair", mutates_args={"tickets1", "tickets2"})
def neuron_adapter_pair(
    x: torch.Tensor,
    Wt1: torch.Tensor,
    thresholds1: torch.Tensor,
    bias1: torch.Tensor | None,
    tickets1: torch.Tensor | None,
    Wt2: torch.Tensor,
    thresholds2: torch.Tensor,
    bias2: torch.Tensor | None,
    tickets2: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two neuron adapters on one input (q and k, gate and up): ``neuron_adapter`` of each, in one launch."""
    first, second = (Wt1, thresholds1, bias1), (Wt2, thresholds2, bias2)
    if x.device.type != "cuda":
        return neuron_adapter_reference(x, *first), neuron_adapter_reference(x, *second)
    if _opaque(x):
        return neuron_adapter_pair_decode(x, *first, tickets1, *second, tickets2)
    return _neuron.neuron_adapter_pair(x, first, second, tickets=_pair_tickets(tickets1, tickets2))


def _pair_tickets(tickets1: torch.Tensor | None, tickets2: torch.Tensor | None) -> tuple | None:
    """Both units' persistent ticket buffers, or None (the launcher fills its own) unless both are given."""
    return None if tickets1 is None or tickets2 is None else (tickets1, tickets2)


@torch.library.triton_op("ranapass::gated_neuron_adapter", mutates_args={"tickets"})
def gated_neuron_adapter(
    gate: torch.Tensor,
    up: torch.Tensor,
    Wt: torch.Tensor,
    thresholds: torch.Tensor,
    bias: torch.Tensor | None,
    tickets: torch.Tensor | None,
    activation: str,
) -> torch.Tensor:
    """Neuron adapter on ``h = act(gate) * up``: the down projection of a gated MLP with its middle fused."""
    if gate.device.type != "cuda":
        return neuron_adapter_reference(gated_activation(gate, up, activation), Wt, thresholds, bias)
    if _opaque(gate):
        return gated_neuron_adapter_decode(gate, up, Wt, thresholds, bias, tickets, activation)
    return _neuron.gated_neuron_adapter(gate, up, Wt, thresholds, bias, activation, tickets=tickets)


# ------------------------------------------------------------------------------------------------------------
# The decode launches as opaque ops (see the module docstring). Each runs the launcher directly; the
# launchers run on CPU tensors too under TRITON_INTERPRET=1, which is how CI tests these ops.


def _out(x: torch.Tensor, m: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], m)


@torch.library.custom_op("ranapass::rank_adapter_decode", mutates_args=())
def rank_adapter_decode(x: torch.Tensor, B: torch.Tensor, At: torch.Tensor, thresholds: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
    """``rank_adapter``'s decode kernels, launched directly (``B`` a frozen weight)."""
    with direct_launch():
        return _rank.rank_adapter(x, B, At, thresholds, bias, frozen_weights=True)


@rank_adapter_decode.register_fake
def _(x, B, At, thresholds, bias):
    return _out(x, At.shape[1])


@torch.library.custom_op("ranapass::rank_adapter_pair_decode", mutates_args=())
def rank_adapter_pair_decode(x: torch.Tensor, B1: torch.Tensor, At1: torch.Tensor, thresholds1: torch.Tensor,
                             bias1: torch.Tensor | None, B2: torch.Tensor, At2: torch.Tensor,
                             thresholds2: torch.Tensor, bias2: torch.Tensor | None) -> tuple[torch.Tensor,
                                                                                             torch.Tensor]:
    """``rank_adapter_pair``'s decode kernels, launched directly (``B1``, ``B2`` frozen weights)."""
    with direct_launch():
        return _rank.rank_adapter_pair(x, (B1, At1, thresholds1, bias1), (B2, At2, thresholds2, bias2),
                                       frozen_weights=True)


@rank_adapter_pair_decode.register_fake
def _(x, B1, At1, thresholds1, bias1, B2, At2, thresholds2, bias2):
    return _out(x, At1.shape[1]), _out(x, At2.shape[1])


@torch.library.custom_op("ranapass::neuron_adapter_decode", mutates_args={"tickets"})
def neuron_adapter_decode(x: torch.Tensor, Wt: torch.Tensor, thresholds: torch.Tensor,
                          bias: torch.Tensor | None, tickets: torch.Tensor | None) -> torch.Tensor:
    """``neuron_adapter``'s decode kernel, launched directly."""
    with direct_launch():
        return _neuron.neuron_adapter(x, Wt, thresholds, bias, tickets=tickets)


@neuron_adapter_decode.register_fake
def _(x, Wt, thresholds, bias, tickets):
    return _out(x, Wt.shape[1])


@torch.library.custom_op("ranapass::neuron_adapter_pair_decode", mutates_args={"tickets1", "tickets2"})
def neuron_adapter_pair_decode(x: torch.Tensor, Wt1: torch.Tensor, thresholds1: torch.Tensor,
                               bias1: torch.Tensor | None, tickets1: torch.Tensor | None, Wt2: torch.Tensor,
                               thresholds2: torch.Tensor, bias2: torch.Tensor | None,
                               tickets2: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``neuron_adapter_pair``'s decode kernel, launched directly."""
    with direct_launch():
        return _neuron.neuron_adapter_pair(x, (Wt1, thresholds1, bias1), (Wt2, thresholds2, bias2),
                                           tickets=_pair_tickets(tickets1, tickets2))


@neuron_adapter_pair_decode.register_fake
def _(x, Wt1, thresholds1, bias1, tickets1, Wt2, thresholds2, bias2, tickets2):
    return _out(x, Wt1.shape[1]), _out(x, Wt2.shape[1])


@torch.library.custom_op("ranapass::gated_neuron_adapter_decode", mutates_args={"tickets"})
def gated_neuron_adapter_decode(gate: torch.Tensor, up: torch.Tensor, Wt: torch.Tensor, thresholds: torch.Tensor,
                                bias: torch.Tensor | None, tickets: torch.Tensor | None,
                                activation: str) -> torch.Tensor:
    """``gated_neuron_adapter``'s decode kernel, launched directly."""
    with direct_launch():
        return _neuron.gated_neuron_adapter(gate, up, Wt, thresholds, bias, activation, tickets=tickets)


@gated_neuron_adapter_decode.register_fake
def _(gate, up, Wt, thresholds, bias, tickets, activation):
    return _out(gate, Wt.shape[1])
