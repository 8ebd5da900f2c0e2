"""The gated-mask adapter of the CATS-style baseline: the gate computed densely, the up rows masked by it.

It has no ``torch.ops.ranapass`` op: the FX pass traces ``gated_mask_reference`` into the graph and
Inductor compiles it (the dropped up rows are computed and zeroed there, which is the same result).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from ranapass.adapters.registry import AdapterSpec, register_adapter, stack_bias
from ranapass.cost_model import flops
from ranapass.kernels.activations import lookup

__all__ = ["GatedMaskAdapterSpec", "gate_magnitudes", "gated_mask_reference"]



def gate_magnitudes(x: torch.Tensor, Wg: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """``|act(Wg x + bias)|`` in float32: what the CATS cutoff compares (``bias`` is the gate's, or None)."""
    g = torch.matmul(x.float(), Wg.float().t())
    if bias is not None:
        g = g + bias.float()
    return lookup(activation).fn(g).abs()


def gated_mask_reference(x: torch.Tensor, Wg: torch.Tensor, Wu: torch.Tensor, thresholds: torch.Tensor,
                         bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """``[g, keep * u]`` with ``g = Wg x``, ``u = Wu x`` and ``keep = |act(g)| >= thresholds`` (float32 math).

    The dropped rows of ``u`` are never needed (a kernel skips them); here they are computed and zeroed,
    which is the same result.
    """
    xf = x.float()
    g = torch.matmul(xf, Wg.float().t())
    u = torch.matmul(xf, Wu.float().t())
    if bias is not None:
        d = g.shape[-1]
        g = g + bias[:d].float()
        u = u + bias[d:].float()
    keep = lookup(activation).fn(g).abs() >= thresholds.float()
    return torch.cat([g, torch.where(keep, u, 0.0)], dim=-1).to(x.dtype)


@register_adapter
@dataclasses.dataclass
class GatedMaskAdapterSpec(AdapterSpec):
    """CATS-style gate/up unit: members ``(gate, up)``; output ``[gate x, keep * up x]``.

    ``keep_j = |act((gate x)_j)| >= thresholds_j``; the gate is always computed, the up rows only where
    kept (then ``act(g) * u`` is zero exactly at the dropped units, so the down projection can skip them).

    Args:
        activation: the gate activation, a key of ``ranapass.kernels.activations.ACTIVATIONS``.
        thresholds: ``[d]`` float32 cutoffs on ``|act(gate x)|`` (CATS: one value per layer).
    """

    kind: ClassVar[str] = "gated_mask"
    reference = staticmethod(gated_mask_reference)
    tensor_names: ClassVar[tuple[str, ...]] = ("thresholds",)
    activation: str = "silu"
    thresholds: torch.Tensor = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.members) != 2 or self.out_features[0] != self.out_features[1]:
            raise ValueError(f"gated mask adapter needs (gate, up) members of equal width, got {self.members} "
                             f"with widths {self.out_features}")
        lookup(self.activation)  # an unknown name is a ValueError naming the known ones
        if self.thresholds is None or self.thresholds.shape != (self.width,):
            shape = None if self.thresholds is None else tuple(self.thresholds.shape)
            raise ValueError(f"gated mask adapter {self.members}: thresholds of shape {shape}, expected ({self.width},)")

    @property
    def width(self) -> int:
        return self.out_features[0]

    def flops(self, kept: float | Any) -> Any:
        d, n = self.width, self.in_features
        return flops.T * (2 * n * d + 2 * n * kept + flops.MASK_FLOPS_PER_SCORE * d)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "activation": self.activation}

    def operands(self, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
                 ) -> dict[str, torch.Tensor | None]:
        w = weights[0]
        return {"Wg": weights[0].detach(), "Wu": weights[1].detach(),
                "thresholds": self.thresholds.to(w.device, torch.float32).contiguous(),
                "bias": stack_bias(biases, self.out_features, w)}

    def constants(self) -> tuple[Any, ...]:
        return (self.activation,)

    def magnitudes(self, x: torch.Tensor, operands: dict[str, torch.Tensor | None]) -> torch.Tensor:
        bias = operands["bias"]
        return gate_magnitudes(x, operands["Wg"], None if bias is None else bias[: self.width], self.activation)

    def entry_norms(self, operands: dict[str, torch.Tensor | None]) -> torch.Tensor:
        return torch.ones(self.width, device=operands["thresholds"].device)  # CATS: one cutoff, no weighting
