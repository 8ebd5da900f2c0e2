"""The ``torch.ops.ranapass`` operators that the FX pass emits.

Each op is a ``triton_op``: torch.compile traces its body, so on CUDA Inductor launches the Triton
kernels directly (rank_adapter.py, neuron_adapter.py), and on any other device the body is the torch
reference math, which Inductor's C++ backend compiles. Output shapes never depend on the masks and
the kernels never sync with the host (static shapes, CUDA-graph safe). One decode token runs the
row-skipping kernels with tiles chosen from the weight shapes (configs.py); more tokens (batched
decode, prefill) run cuBLAS GEMMs on the masked inputs (masked_gemm.py).
"""

from __future__ import annotations

import torch

from ranapass.kernels import neuron_adapter as _neuron
from ranapass.kernels import rank_adapter as _rank
from ranapass.kernels.reference import gated_activation, neuron_adapter_reference, rank_adapter_reference

__all__ = ["rank_adapter", "rank_adapter_pair", "neuron_adapter", "gated_neuron_adapter"]


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
    return _rank.rank_adapter_pair(x, first, second)


@torch.library.triton_op("ranapass::neuron_adapter", mutates_args=())
def neuron_adapter(
    x: torch.Tensor,
    Wt: torch.Tensor,
    thresholds: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``y = (keep * x) Wt + bias`` with ``keep = |x| >= thresholds``; see kernels/reference.py."""
    if x.device.type != "cuda":
        return neuron_adapter_reference(x, Wt, thresholds, bias)
    return _neuron.neuron_adapter(x, Wt, thresholds, bias)


@torch.library.triton_op("ranapass::gated_neuron_adapter", mutates_args=())
def gated_neuron_adapter(
    gate: torch.Tensor,
    up: torch.Tensor,
    Wt: torch.Tensor,
    thresholds: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
) -> torch.Tensor:
    """Neuron adapter on ``h = act(gate) * up``: the down projection of a gated MLP with its middle fused."""
    if gate.device.type != "cuda":
        return neuron_adapter_reference(gated_activation(gate, up, activation), Wt, thresholds, bias)
    return _neuron.gated_neuron_adapter(gate, up, Wt, thresholds, bias, activation)
