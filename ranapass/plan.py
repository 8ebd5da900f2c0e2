"""A plan: one configuration per unit (dense or an adapter), bound to one model's weights.

Plans are what allocation produces and what ``attach`` consumes. They persist as a directory with
``plan.json`` (versioned, ``_type``/``_version``, no pickle) and ``tensors.safetensors``; loading
checks the JSON against an allowlist of adapter kinds, and ``attach`` checks the weights fingerprint.
"""

from __future__ import annotations

import dataclasses
import math
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

_CORRECTION = {"out_scale", "out_bias"}  # an adapter's optional output correction (AdapterSpec.correction)
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
        """Write ``plan.json`` + ``tensors.safetensors`` (and their manifest) into directory ``path``, atomically;
        an inconsistent plan (see ``check``) is refused."""
        tensors: dict[str, torch.Tensor] = {}
        units = []
        for i, u in enumerate(self.units):
            entry = {"name": u.name, "members": list(u.members), "out_features": list(u.out_features),
                     "in_features": u.in_features, "expected_kept": u.expected_kept,
                     "predicted_error": u.predicted_error, "adapter": None}
            if u.adapter is not None:
                entry["adapter"] = u.adapter.config()
                for key, t in {**u.adapter.tensors(), **u.adapter.correction()}.items():
                    tensors[f"{i}.{key}"] = t.detach().to("cpu").contiguous()
            units.append(entry)
        self.check()
        doc = {"budget": self.budget, "allocation": self.allocation, "fingerprint": self.fingerprint,
               "meta": self.meta, "units": units}
        return storage.write(path, PLAN_FORMAT, doc, tensors)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        """Read a plan written by ``save``, checked whole.

        Raises:
            RanapassError: the folder is missing, damaged (manifest), of another type or version, or
                its content is inconsistent (unknown kinds, missing or extra tensors, shapes that do
                not match the units, NaN or negative thresholds); the message names the folder.
        """
        doc, tensors = storage.read(path, PLAN_FORMAT)
        with storage.parsing(path, PLAN_FORMAT):
            units, used = [], set()
            for i, e in enumerate(doc["units"]):
                adapter = None
                if e["adapter"] is not None:
                    adapter, keys = _saved_adapter(path, i, e, tensors)
                    used |= keys
                kept = e["expected_kept"]
                units.append(UnitPlan(str(e["name"]), tuple(e["members"]), tuple(int(m) for m in e["out_features"]),
                                      int(e["in_features"]), adapter, None if kept is None else float(kept),
                                      float(e["predicted_error"])))
            plan = cls(units, float(doc["budget"]), str(doc["allocation"]), str(doc["fingerprint"]),
                       dict(doc.get("meta") or {}))
        unused = sorted(set(tensors) - used)
        if unused:
            raise RanapassError(f"{path}: {PLAN_FORMAT.tensors} holds tensors no unit of {PLAN_FORMAT.document} "
                                f"uses ({', '.join(unused[:4])}): the two files come from different plans; "
                                f"{PLAN_FORMAT.remedy}")
        plan.check(str(path))
        return plan

    def check(self, where: str = "plan") -> None:
        """Raise ``RanapassError`` unless the plan is consistent: a positive budget, each linear in one
        unit, adapters matching their unit's shape, finite tensors, thresholds never NaN or negative."""
        def bad(what: str) -> RanapassError:
            return RanapassError(f"{where}: {what}; {PLAN_FORMAT.remedy}")

        if not (math.isfinite(self.budget) and self.budget > 0.0):
            raise bad(f"budget {self.budget} is not a positive number")
        seen: set[str] = set()
        for u in self.units:
            if not u.members or len(u.members) != len(u.out_features) or min(u.out_features) < 1 or u.in_features < 1:
                raise bad(f"unit {u.name!r} has members {u.members}, out_features {u.out_features}, "
                          f"in_features {u.in_features}")
            if seen & set(u.members):
                raise bad(f"unit {u.name!r} repeats linears of another unit: {sorted(seen & set(u.members))}")
            seen |= set(u.members)
            if not math.isfinite(u.predicted_error) or (u.expected_kept is not None and not
                                                         math.isfinite(u.expected_kept)):
                raise bad(f"unit {u.name!r} has a non-finite expected_kept or predicted_error")
            a = u.adapter
            if a is None:
                continue
            if (a.members, a.out_features, a.in_features) != (u.members, u.out_features, u.in_features):
                raise bad(f"unit {u.name!r} ({u.out_features} x {u.in_features}) holds an adapter for "
                          f"{a.members} ({a.out_features} x {a.in_features})")
            if not (math.isfinite(a.tau) and a.tau >= 0):
                raise bad(f"unit {u.name!r} has threshold tau {a.tau}")
            for name, t in {**a.tensors(), **a.correction()}.items():
                if not t.is_floating_point():
                    raise bad(f"unit {u.name!r}: tensor {name} has dtype {t.dtype}, not floating point")
                if name == "thresholds" and bool((t.isnan() | (t < 0)).any()):
                    raise bad(f"unit {u.name!r} has NaN or negative thresholds")
                if name != "thresholds" and not bool(t.isfinite().all()):
                    raise bad(f"unit {u.name!r}: tensor {name} holds NaN or infinite values")


def _saved_adapter(path: str | os.PathLike, index: int, entry: dict[str, Any],
                   tensors: dict[str, torch.Tensor]) -> tuple[AdapterSpec, set[str]]:
    """Unit ``index``'s adapter from its JSON entry and its tensors ``<index>.<name>``; the tensor keys used."""
    kind = entry["adapter"]["kind"]
    if kind not in ADAPTER_KINDS:
        raise RanapassError(f"{path}: unit {entry['name']!r} uses unknown adapter kind {kind!r}; "
                            f"known: {sorted(ADAPTER_KINDS)}")
    spec = ADAPTER_KINDS[kind]
    prefix = f"{index}."
    own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    want = set(spec.tensor_names)
    if set(own) - _CORRECTION != want or set(own) & _CORRECTION not in (set(), _CORRECTION):
        raise RanapassError(f"{path}: unit {entry['name']!r} is a {kind!r} adapter, whose tensors are {sorted(want)} "
                            f"(and optionally {sorted(_CORRECTION)}), but {PLAN_FORMAT.tensors} holds {sorted(own)} "
                            f"for it: the JSON and the tensors do not match; {PLAN_FORMAT.remedy}")
    return spec.from_saved(entry["adapter"], own), {prefix + k for k in own}
