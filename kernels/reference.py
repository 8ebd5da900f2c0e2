"""Reference math of the two RaNA adapters, in plain torch.

Every other path (eager attach, the CPU branch of the custom ops, the Triton kernels, prefill and
decode, any batch) must equal these functions up to floating-point rounding.

Rank adapter (replaces ``y = W x + b``, W of shape m x n)::

    z      = B x                      # B: [nB, n], always paid
    keep_i = |z_i| >= t_i             # t_i = tau / ||A[:, i]||, one scalar tau per adapter
    y      = A (keep * z) + b         # stored as At = A^T: [nB, m], rank-major

Neuron adapter (input sparsity, TEAL/CATS-style; used where the input is wide and already computed)::

    keep_j = |x_j| >= t_j             # t_j = tau / ||W[:, j]||
    y      = W (keep * x) + b         # stored as Wt = W^T: [n, m], input-major

Masks are per token. Thresholds are stored per rank (per input) so the score ``|z_i| * ||A_i||``
needs no multiply at run time. The math runs in float32 whatever the input dtype and the result is
cast back, so the mask decisions do not depend on how a backend rounds ``z``.
"""

from __future__ import annotations

import torch

from ranapass.kernels.activations import gated_activation

__all__ = [
    "rank_adapter_reference",
    "rank_adapter_scores",
    "neuron_adapter_reference",
    "neuron_adapter_keep",
    "gated_activation",
]


def rank_adapter_scores(x: torch.Tensor, B: torch.Tensor, thresholds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``z = B x`` (float32, ``[..., nB]``) and the keep mask ``|z| >= thresholds``."""
    z = torch.matmul(x.float(), B.float().t())
    return z, z.abs() >= thresholds.float()


def rank_adapter_reference(
    x: torch.Tensor,
    B: torch.Tensor,
    At: torch.Tensor,
    thresholds: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = At^T (keep * B x) + bias`` for ``x: [..., n]``; returns ``[..., m]`` in ``x.dtype``."""
    z, keep = rank_adapter_scores(x, B, thresholds)
    y = torch.matmul(torch.where(keep, z, 0.0), At.float())
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def neuron_adapter_keep(x: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Keep mask ``|x_j| >= thresholds_j`` of the neuron adapter, ``[..., n]``."""
    return x.float().abs() >= thresholds.float()


def neuron_adapter_reference(
    x: torch.Tensor,
    Wt: torch.Tensor,
    thresholds: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = (keep * x) Wt + bias`` for ``x: [..., n]``, ``Wt: [n, m]``; returns ``[..., m]`` in ``x.dtype``."""
    xf = x.float()
    y = torch.matmul(torch.where(neuron_adapter_keep(xf, thresholds), xf, 0.0), Wt.float())
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
