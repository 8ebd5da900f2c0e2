"""What the FX pass did to one graph: the op nodes it emitted, the linears it left dense and why.

``rewrite_linears`` (fx_pass.py) returns a ``RewriteReport``; ``RanaBackend`` keeps one per compiled
graph and ``ranapass.diff`` renders them.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

__all__ = ["RewriteError", "OpRewrite", "LeftDense", "RewriteReport", "EXPERTS_WHY"]

EXPERTS_WHY = "3D expert weights are not adapted"
"""Why mixture-of-experts weights stay dense (``ranapass.experts``), in every report that says so."""


class RewriteError(RuntimeError):
    """Raised in strict mode when a registered weight could not be rewritten."""


@dataclasses.dataclass
class OpRewrite:
    """One op node the pass emitted and the linear nodes it replaced.

    Args:
        node: name of the new op node.
        unit: name of the plan unit.
        op: the op, e.g. ``ranapass.rank_adapter``, or the qualified name of the reference function of a
            kind without an op, traced in its place.
        old_op: what the replaced nodes called (``torch._C._nn.linear`` or ``call_module:nn.Linear``).
        replaced: names of the replaced linear nodes, in member order.
        members: module paths of the replaced linears.
        outputs: replaced node name -> name of the node that now stands for it (a slice, or the op).
        partial: the unit has members that do not read this input (the op still computes all of them).
        width: maskable entries per token (the kind's width: static rank nB, input width n, ...).
        expected_kept: expected kept ranks/inputs per token from the plan.
        flops_before: dense FLOPs per token of the replaced linears.
        flops_after: FLOPs per token of the op at the expected kept count.
    """

    node: str
    unit: str
    op: str
    old_op: str
    replaced: tuple[str, ...]
    members: tuple[str, ...]
    outputs: dict[str, str]
    partial: bool
    width: int
    expected_kept: float | None
    flops_before: float
    flops_after: float
    _unit: Any = dataclasses.field(default=None, repr=False, compare=False)  # weakref to the UnitPlan

    def rewrote(self, unit: Any) -> bool:
        """Whether this op stands for ``unit`` (a ``UnitPlan``), by identity."""
        return self._unit is not None and self._unit() is unit


@dataclasses.dataclass
class LeftDense:
    """A linear node the pass left as it was, with its dense FLOPs per token (0 if its weight is unknown)."""

    node: str
    path: str
    reason: str
    flops: float = 0.0


@dataclasses.dataclass
class RewriteReport:
    """What the pass did to one graph.

    Args:
        rewrites: the op nodes emitted.
        skipped: linears with a registered weight that stayed dense, each with its reason.
        dense: linears without a registered weight (e.g. lm_head), left dense.
        unfound: member paths of registered weights that this graph reads but never through a linear
            the pass recognises: they stay dense.
        experts: the 3D expert weights of mixture-of-experts blocks this graph reads, left dense (no adapter
            kind covers them), with their FLOPs per token at the router's experts per token.
        counters: ``rewritten_units``, ``rewritten_linears``, ``ops``, ``dense_unregistered``,
            ``skipped_<reason>``.
    """

    rewrites: list[OpRewrite] = dataclasses.field(default_factory=list)
    skipped: list[LeftDense] = dataclasses.field(default_factory=list)
    dense: list[LeftDense] = dataclasses.field(default_factory=list)
    unfound: list[str] = dataclasses.field(default_factory=list)
    experts: list[LeftDense] = dataclasses.field(default_factory=list)
    counters: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    @property
    def units(self) -> list[str]:
        """Names of the units rewritten in this graph, in graph order."""
        return list(dict.fromkeys(r.unit for r in self.rewrites))

    @property
    def rewritten(self) -> int:
        """Number of units rewritten (a unit called twice counts once)."""
        return len(self.units)

    @property
    def complete(self) -> bool:
        """True when every registered weight this graph reads was rewritten."""
        return not self.skipped and not self.unfound

    def summary(self) -> str:
        """A few lines: units and linears rewritten, and everything left dense with its reason."""
        c = self.counters
        lines = [f"rewrote {self.rewritten} unit(s): {c['rewritten_linears']} linear(s) -> {c['ops']} ranapass op(s)"]
        partial = [r.unit for r in self.rewrites if r.partial]
        if partial:
            lines.append(f"  partial units (members read different inputs; each op computes the whole unit): "
                         f"{', '.join(dict.fromkeys(partial))}")
        by_reason: dict[str, list[str]] = {}
        for s in self.skipped:
            by_reason.setdefault(s.reason, []).append(s.path)
        for reason, paths in by_reason.items():
            lines.append(f"  left dense (registered) {reason}: {', '.join(paths)}")
        if self.unfound:
            lines.append(f"  left dense (registered, read outside any linear): {', '.join(self.unfound)}")
        if self.dense:
            lines.append(f"  dense, no adapter registered: {', '.join(d.path for d in self.dense)}")
        if self.experts:
            expert_flops = sum(d.flops for d in self.experts)
            lines.append("  " + _experts_line(len(self.experts), expert_flops, self.linear_flops()))
        return "\n".join(lines)

    def linear_flops(self) -> float:
        """Dense FLOPs per token of every linear and expert weight of this graph (rewritten or not)."""
        return sum(r.flops_before for r in self.rewrites) + sum(d.flops for d in (*self.skipped, *self.dense,
                                                                                   *self.experts))


def _experts_line(count: int, expert_flops: float, total_flops: float) -> str:
    """The report line on expert weights left dense (``total_flops``: the graph's, experts included)."""
    share = expert_flops / total_flops if total_flops else 0.0
    return (f"left dense: {count} expert parameter(s) ({share:.1%} of the graph's linear and expert FLOPs, "
            f"{expert_flops / 1e6:.3f} MFLOP/token): {EXPERTS_WHY}")
