"""What a compression kept: per-module ranks and energies, totals, a printable table and a JSON-able dict."""

from __future__ import annotations

import dataclasses
from typing import Any

from ranapass.lora.io import LoraAdapter

__all__ = ["LoraCompression", "ModuleRanks"]

_ENERGY_LABELS = {"output": "output energy (E|dW x|^2)", "fisher": "loss-weighted output energy (|G^1/2 dW L|^2)"}
_DEFAULT_ENERGY_LABEL = "update energy (|dW|_F^2)"


@dataclasses.dataclass
class ModuleRanks:
    """One row of the compression table: a module's rank before and after, and the share of its update's
    energy kept (``‖ΔW‖²_F``, or ``E‖ΔW x‖²`` with a calibration)."""

    name: str
    shape: tuple[int, int]
    rank: int
    kept: int
    energy: float
    energy_kept: float

    @property
    def params_before(self) -> int:
        return self.rank * sum(self.shape)

    @property
    def params_after(self) -> int:
        return self.kept * sum(self.shape)


@dataclasses.dataclass
class LoraCompression:
    """The compressed adapter and what was kept of each module.

    Args:
        adapter: the compressed adapter (``adapter.save(dir)`` writes it).
        modules: per module, its rank before and after and the share of ΔW's energy kept.
        method, target, keep, error: the settings used.
        cost_before, cost_after: total cost in the target's unit (parameters, or FLOPs per token).
    """

    adapter: LoraAdapter
    modules: list[ModuleRanks]
    method: str
    target: str
    keep: float
    error: str
    cost_before: float
    cost_after: float

    @property
    def params_before(self) -> int:
        return sum(m.params_before for m in self.modules)

    @property
    def params_after(self) -> int:
        return sum(m.params_after for m in self.modules)

    @property
    def energy_kept(self) -> float:
        """Share of the adapter's total update energy kept (Σ ‖ΔW‖²_F, or Σ E‖ΔW x‖² calibrated)."""
        whole = sum(m.energy for m in self.modules)
        return sum(m.energy * m.energy_kept for m in self.modules) / whole if whole else 1.0

    @property
    def predicted_loss_change(self) -> float | None:
        """With ``error="fisher"``, the second-order prediction of the loss increase (nats per token): half the
        discarded loss-weighted energy, ``½ Σ ‖G^½ (ΔW - ΔW_k) L‖²_F``; None for other errors."""
        if self.error != "fisher":
            return None
        return 0.5 * sum(m.energy * (1 - m.energy_kept) for m in self.modules)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method, "target": self.target, "keep": self.keep, "error": self.error,
            "params_before": self.params_before, "params_after": self.params_after,
            "params_ratio": self.params_after / self.params_before if self.params_before else 1.0,
            "cost_before": self.cost_before, "cost_after": self.cost_after,
            "energy_kept": self.energy_kept, "predicted_loss_change": self.predicted_loss_change,
            "modules": [{"name": m.name, "shape": list(m.shape), "rank": m.rank, "kept": m.kept,
                         "energy_kept": m.energy_kept} for m in self.modules],
        }

    def summary(self) -> str:
        """A per-module table (module, shape, rank before, rank kept, energy kept) and the totals."""
        width = max([len("module"), *(len(m.name) for m in self.modules)])
        lines = [f"{'module':<{width}}  {'shape':>11}  {'rank':>4}  {'kept':>4}  {'energy kept':>11}"]
        for m in self.modules:
            shape = f"{m.shape[0]}x{m.shape[1]}"
            lines.append(f"{m.name:<{width}}  {shape:>11}  {m.rank:>4}  {m.kept:>4}  {m.energy_kept:>10.2%}")
        ratio = self.params_after / self.params_before if self.params_before else 1.0
        dropped = sum(m.kept == 0 for m in self.modules)
        lines += [
            "",
            f"method {self.method} (target {self.target}, keep {self.keep:g}, error {self.error})",
            f"LoRA parameters: {self.params_before:,} -> {self.params_after:,} ({ratio:.2%})",
        ]
        if self.target == "flops":
            lines.append(f"FLOPs per token: {self.cost_before:,.0f} -> {self.cost_after:,.0f} "
                         f"({self.cost_after / self.cost_before:.2%})")
        energy = _ENERGY_LABELS.get(self.error, _DEFAULT_ENERGY_LABEL)
        lines.append(f"{energy} kept: {self.energy_kept:.2%}; modules dropped (rank 0): {dropped} of "
                     f"{len(self.modules)}")
        if self.predicted_loss_change is not None:
            lines.append(f"predicted loss change (second order): {self.predicted_loss_change:+.4f} nats per token")
        return "\n".join(lines)
