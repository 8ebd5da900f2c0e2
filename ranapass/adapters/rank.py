"""The rank adapter: data-aware low rank with per-token rank masks (``kernels/reference.py`` has its math)."""

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

__all__ = ["RankAdapterSpec"]


@register_adapter
@dataclasses.dataclass
class RankAdapterSpec(AdapterSpec):
    """``y = At^T (keep * B x) + b`` with ``keep = |B x| >= thresholds``.

    Args:
        B: ``[rank, in_features]``, the first factor (always computed).
        At: ``[rank, out_total]``, A transposed (rank-major), so a dropped rank skips one row.
        thresholds: ``[rank]`` float32, ``tau / ||A[:, i]||``; ``0`` keeps every rank (static low rank).
    """

    kind: ClassVar[str] = "rank"
    lowering: ClassVar[Lowering] = Lowering("rank_adapter", pair_op="rank_adapter_pair")
    reference = kernel_reference("rank_adapter_reference")
    output_operand: ClassVar[str] = "At"
    tensor_names: ClassVar[tuple[str, ...]] = ("B", "At", "thresholds")
    B: torch.Tensor = None
    At: torch.Tensor = None
    thresholds: torch.Tensor = None

    def __post_init__(self) -> None:
        super().__post_init__()
        rank = self.B.shape[0]
        if self.B.shape != (rank, self.in_features) or self.At.shape != (rank, self.out_total) \
                or self.thresholds.shape != (rank,):
            raise ValueError(f"rank adapter {self.members}: inconsistent shapes B {tuple(self.B.shape)}, "
                             f"At {tuple(self.At.shape)}, thresholds {tuple(self.thresholds.shape)} "
                             f"for in {self.in_features}, out {self.out_total}")

    @property
    def rank(self) -> int:
        return self.B.shape[0]

    @property
    def width(self) -> int:
        return self.rank

    def flops(self, kept: float | Any) -> Any:
        return flops.rank_adapter(self.out_total, self.in_features, self.rank, kept)

    @classmethod
    def from_candidate(cls, unit: UnitCandidates, index: int, weight: torch.Tensor) -> RankAdapterSpec:
        """Candidate ``index`` of the rank curve: ``A`` the first ``nB`` output principal axes, ``B = A^T W``."""
        curve = unit.curves[cls.kind]
        nb, tau = int(curve.rank[index]), float(curve.tau[index])
        a = unit.basis[:, :nb]
        b = (a.t().to(weight.device) @ weight).cpu()  # on the weight's device (a GPU), kept on the host
        return cls(unit.members, unit.out_features, unit.in_features, tau, B=b.contiguous(),
                   At=a.t().contiguous(), thresholds=per_entry_thresholds(tau, a.norm(dim=0)))

    def operands(self, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
                 ) -> dict[str, torch.Tensor | None]:
        w = weights[0]
        return {"B": self.B.to(w.device, w.dtype).contiguous(),
                "At": self.At.to(w.device, w.dtype).contiguous(),
                "thresholds": self.thresholds.to(w.device, torch.float32).contiguous(),
                "bias": stack_bias(biases, self.out_features, w)}

    def magnitudes(self, x: torch.Tensor, operands: dict[str, torch.Tensor | None]) -> torch.Tensor:
        from ranapass.kernels.reference import rank_adapter_scores

        z, _ = rank_adapter_scores(x, operands["B"], operands["thresholds"])
        return z.abs()

    def entry_norms(self, operands: dict[str, torch.Tensor | None]) -> torch.Tensor:
        return operands["At"].float().norm(dim=1)
