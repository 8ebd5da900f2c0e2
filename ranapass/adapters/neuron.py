"""The neuron adapter: input (activation) sparsity, ``kernels/reference.py`` has its math."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ranapass.adapters.registry import (AdapterSpec, Lowering, kernel_reference, per_entry_thresholds,
                                        register_adapter, stack_bias)
from ranapass.cost_model import flops

if TYPE_CHECKING:
    from ranapass.candidates import UnitCandidates

__all__ = ["NeuronAdapterSpec"]


@register_adapter
@dataclasses.dataclass
class NeuronAdapterSpec(AdapterSpec):
    """``y = W (keep * x) + b`` with ``keep = |x_j| >= thresholds_j``.

    Args:
        weighted: the score ``tau`` cuts is ``|x_j| * ||W[:, j]||`` (RaNA's, True) or ``|x_j|`` alone (TEAL's,
            False): threshold fitting keeps the plan's criterion.
        thresholds: ``[in_features]`` float32, ``tau / ||W[:, j]||`` over the stacked members' weights
            (``tau`` everywhere when not ``weighted``).
    The weight itself comes from the model when bound (transposed, input-major: operand ``Wt``).
    """

    kind: ClassVar[str] = "neuron"
    lowering: ClassVar[Lowering] = Lowering("neuron_adapter", tickets=True, gated_op="gated_neuron_adapter",
                                           pair_op="neuron_adapter_pair")
    reference = kernel_reference("neuron_adapter_reference")
    output_operand: ClassVar[str] = "Wt"
    tensor_names: ClassVar[tuple[str, ...]] = ("thresholds",)
    weighted: bool = True
    thresholds: torch.Tensor = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.thresholds.shape != (self.in_features,):
            raise ValueError(f"neuron adapter {self.members}: thresholds of shape {tuple(self.thresholds.shape)}, "
                             f"expected ({self.in_features},)")

    @property
    def width(self) -> int:
        return self.in_features

    def flops(self, kept: float | Any) -> Any:
        return flops.neuron_adapter(self.out_total, self.in_features, kept)

    @classmethod
    def from_candidate(cls, unit: UnitCandidates, index: int, weight: torch.Tensor) -> NeuronAdapterSpec:
        """Candidate ``index`` of the neuron curve: thresholds ``tau / ||W[:, j]||``."""
        tau = float(unit.curves[cls.kind].tau[index])
        return cls(unit.members, unit.out_features, unit.in_features, tau,
                   thresholds=per_entry_thresholds(tau, weight.norm(dim=0)).cpu())

    def operands(self, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
                 ) -> dict[str, torch.Tensor | None]:
        w = weights[0]
        return {"Wt": torch.cat([x.detach() for x in weights], dim=0).t().contiguous(),
                "thresholds": self.thresholds.to(w.device, torch.float32).contiguous(),
                "bias": stack_bias(biases, self.out_features, w)}

    def magnitudes(self, x: torch.Tensor, operands: dict[str, torch.Tensor | None]) -> torch.Tensor:
        return x.float().abs()

    def entry_norms(self, operands: dict[str, torch.Tensor | None]) -> torch.Tensor:
        if not self.weighted:
            return torch.ones(self.in_features, device=operands["thresholds"].device)
        return operands["Wt"].float().norm(dim=1)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "weighted": self.weighted}
