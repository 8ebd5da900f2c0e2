"""A plan: one configuration per unit (dense or an adapter), bound to one model's weights.

Plans are what allocation produces and what ``attach`` consumes. They persist as a directory with
``plan.json`` (versioned, ``_type``/``_version``, no pickle) and ``tensors.safetensors``; loading
checks the JSON against an allowlist of adapter kinds, and ``attach`` checks the weights fingerprint.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import sympy
import torch

from ranapass import storage
from ranapass.adapters import ADAPTER_KINDS, AdapterSpec
from ranapass.cost_model import flops
from ranapass.errors import RanapassError

__all__ = ["UnitPlan", "Plan", "PlanMismatchError"]

PLAN_FORMAT = storage.Format("ranapass.Plan", 1, "plan.json", "tensors.safetensors", "re-plan from the profile")


class PlanMismatchError(RanapassError):
    """A plan (or profile) was applied to a model whose weights it was not made for."""


@dataclasses.dataclass
class UnitPlan:
    """The configuration chosen for one unit.

    Args:
        name: unit name (the member path for a single linear, ``<prefix>.{q,k,v}_proj`` style for groups).
        members: module paths of the linears in the unit, in output order.
        out_features: output width of each member.
        in_features: shared input width.
        adapter: the adapter, or None to leave the unit dense.
        expected_kept: expected kept ranks/inputs per token on calibration text (None when dense).
        predicted_error: the allocator's weighted error estimate of this choice (0 when dense).
    """

    name: str
    members: tuple[str, ...]
    out_features: tuple[int, ...]
    in_features: int
    adapter: AdapterSpec | None = None
    expected_kept: float | None = None
    predicted_error: float = 0.0

    @property
    def kind(self) -> str:
        return "dense" if self.adapter is None else self.adapter.kind

    @property
    def dense_flops(self) -> float:
        """Dense FLOPs per token of the unit's linears."""
        return flops.per_token(flops.dense_linear(sum(self.out_features), self.in_features))

    def flops(self, kept: float | None = None) -> float:
        """FLOPs per token, at ``kept`` (default: the expected kept count)."""
        if self.adapter is None:
            return self.dense_flops
        return flops.per_token(self.adapter.flops(self.expected_kept if kept is None else kept))


@dataclasses.dataclass
class Plan:
    """One configuration per unit for a model, under a FLOP budget.

    Args:
        units: every unit of the model's block linears, adapted or dense.
        budget: requested ratio of adapted to dense FLOPs over the block linears.
        allocation: how ranks were allocated ("global", "uniform", ...).
        fingerprint: ``weights_fingerprint`` of the model the plan was made for.
        meta: free-form JSON-able facts (model name, profile settings, threshold fitting, ...).
    """

    units: list[UnitPlan]
    budget: float
    allocation: str
    fingerprint: str
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    # ------------------------------------------------------------------ queries
    @property
    def adapted(self) -> list[UnitPlan]:
        return [u for u in self.units if u.adapter is not None]

    def unit(self, name: str) -> UnitPlan:
        for u in self.units:
            if u.name == name:
                return u
        raise KeyError(f"no unit {name!r} in this plan")

    def dense_flops(self) -> float:
        """Dense FLOPs per token over the block linears."""
        return sum(u.dense_flops for u in self.units)

    def expected_flops(self) -> float:
        """Expected FLOPs per token over the block linears (calibration statistics)."""
        return sum(u.flops() for u in self.units)

    def expected_ratio(self) -> float:
        return self.expected_flops() / self.dense_flops()

    def flops(self) -> dict[str, sympy.Expr]:
        """FLOPs as sympy expressions in T: ``{"dense": ..., "adapted": ..., <unit>: ...}``."""
        out = {"dense": sum(flops.dense_linear(sum(u.out_features), u.in_features) for u in self.units)}
        per_unit = {u.name: (u.adapter.flops(u.expected_kept) if u.adapter is not None
                             else flops.dense_linear(sum(u.out_features), u.in_features)) for u in self.units}
        out["adapted"] = sum(per_unit.values())
        out.update(per_unit)
        return out

    def summary(self) -> str:
        """Per-unit table: kind, shape, rank, expected kept, threshold, FLOPs before/after, predicted error."""
        head = f"{'unit':<44} {'kind':<7} {'out x in':>11} {'rank':>5} {'kept':>7} {'tau':>9} " \
               f"{'MFLOP/tok':>10} {'-> after':>9} {'pred.err':>9}"
        lines = [head, "-" * len(head)]
        for u in self.units:
            a = u.adapter
            rank = str(getattr(a, "rank", "")) if a is not None else ""
            kept = f"{u.expected_kept:.1f}" if u.expected_kept is not None else ""
            tau = f"{a.tau:.3g}" if a is not None else ""
            lines.append(f"{u.name:<44} {u.kind:<7} {sum(u.out_features):>5}x{u.in_features:<5} {rank:>5} {kept:>7} "
                         f"{tau:>9} {u.dense_flops / 1e6:>10.3f} {u.flops() / 1e6:>9.3f} {u.predicted_error:>9.3g}")
        lines.append("-" * len(head))
        lines.append(f"budget {self.budget:.3f}  expected FLOP ratio {self.expected_ratio():.4f}  "
                     f"({len(self.adapted)}/{len(self.units)} units adapted, allocation={self.allocation})")
        notes = self.meta.get("left_dense", [])
        block = self.dense_flops() + sum(n["flops"] for n in notes)
        for n in notes:
            lines.append(f"left dense: {n['what']} ({n['flops'] / block:.1%} of block FLOPs, {n['flops'] / 1e6:.3f} "
                         f"MFLOP/token): {n['reason']}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``plan.json`` + ``tensors.safetensors`` into directory ``path``."""
        tensors: dict[str, torch.Tensor] = {}
        units = []
        for i, u in enumerate(self.units):
            entry = {"name": u.name, "members": list(u.members), "out_features": list(u.out_features),
                     "in_features": u.in_features, "expected_kept": u.expected_kept,
                     "predicted_error": u.predicted_error, "adapter": None}
            if u.adapter is not None:
                entry["adapter"] = u.adapter.config()
                for key, t in u.adapter.tensors().items():
                    tensors[f"{i}.{key}"] = t.detach().to("cpu").contiguous()
            units.append(entry)
        doc = {"budget": self.budget, "allocation": self.allocation, "fingerprint": self.fingerprint,
               "meta": self.meta, "units": units}
        return storage.write(path, PLAN_FORMAT, doc, tensors)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        """Read a plan written by ``save``; unknown types, versions or adapter kinds are errors."""
        doc, tensors = storage.read(path, PLAN_FORMAT)
        units = []
        for i, e in enumerate(doc["units"]):
            adapter = None
            if e["adapter"] is not None:
                kind = e["adapter"]["kind"]
                if kind not in ADAPTER_KINDS:
                    raise RanapassError(f"{path}: unit {e['name']!r} uses unknown adapter kind {kind!r}; "
                                        f"known: {sorted(ADAPTER_KINDS)}")
                prefix = f"{i}."
                own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                adapter = ADAPTER_KINDS[kind].from_saved(e["adapter"], own)
            units.append(UnitPlan(e["name"], tuple(e["members"]), tuple(e["out_features"]), e["in_features"],
                                  adapter, e["expected_kept"], e["predicted_error"]))
        return cls(units, doc["budget"], doc["allocation"], doc["fingerprint"], doc.get("meta", {}))
