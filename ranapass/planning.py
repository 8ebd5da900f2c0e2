"""Planning: allocate a FLOP budget over a profile's candidates, then build the plan's adapters.

``PlanOptions`` holds every setting of a plan but its budget, with their defaults. An allocation
strategy (``ALLOCATIONS``, by name) picks one option per unit; ``Planner`` builds the adapters of the
picks from the model's weights and, when asked, re-fits the thresholds on held-out windows.
"""

from __future__ import annotations

import dataclasses
import logging
import numbers
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ranapass.adapters import ADAPTER_KINDS
from ranapass.candidates import KINDS, Site, UnitCandidates
from ranapass.cost_model.allocate import Allocator, Candidates, Choice, InfeasibleBudgetError
from ranapass.cost_model.uniform import allocate_reference
from ranapass.errors import RanapassError
from ranapass.linear_match import linear_module
from ranapass.offload import onloaded
from ranapass.plan import Plan, UnitPlan
from ranapass.thresholds import fit_thresholds

__all__ = ["PlanOptions", "Planner", "ALLOCATIONS", "FIRST_ORDER_MAX_KL", "check_budget"]

log = logging.getLogger(__name__)

FIRST_ORDER_MAX_KL = 0.1
"""The first-order term is a small-perturbation estimate: it is counted only for plans whose summed calibrated
error without it (nats of KL) is at most this. On SmolLM2 its additive sum overstates the gain 2-5 times at
0.8-0.9 and misleads the allocation at 0.4-0.56 (summed errors 0.2-0.6), where it made perplexity worse
(docs/quality.md)."""

Chosen = list[tuple[UnitCandidates, tuple[str, int]]]
"""Per unit, its chosen option ``(curve kind, index)`` (see ``UnitCandidates.options``)."""


@dataclasses.dataclass(frozen=True)
class PlanOptions:
    """How to plan (everything but the budget).

    Args:
        allocation: a name of ``ALLOCATIONS``: "global" (one knapsack over every unit) or "uniform"
            (the reference's recipe: same ratio per block for q/k/v and the MLP, o_proj dense).
        kinds: candidate families allowed (one name or several): any of "rank" (rank adapters, masked or not), "lowrank"
            (static low rank only, no mask) and "neuron".
        grouping: let multi-member sites use one stacked rank adapter.
        fit: re-fit thresholds on the held-out calibration windows (needs them; see ``Profile.holdout``).
        count_mask_cost: charge the masks' compare/select FLOPs during allocation (the reference
            code does not; an ablation). Reported FLOPs always include them.
        error_exponent: "global" allocation minimises the sum of every unit's error to this power: above 1
            it charges concentrated error more than the additive sum does (the loss of several adapted
            units grows faster than the sum of their errors), spreading sparsity more evenly. 1 is the
            plain additive objective; benchmarks/RESULTS.md has the ablation behind the default.
        first_order: add each neuron candidate's first-order loss change (signed, measured by the
            profile's gradient pass) to its objective, converted to the objective's units at the mean
            error of the adapted units of the plan without it (one more allocation). The loss
            calibration's KL has no first-order term, and mild input sparsity can lower the loss
            (docs/quality.md). Used only on loss-calibrated profiles, whose errors are in nats too,
            and only at mild budgets: where the plan without it predicts at most ``FIRST_ORDER_MAX_KL``.
    """

    allocation: str = "global"
    kinds: tuple[str, ...] = ("rank", "neuron")
    grouping: bool = True
    fit: bool = True
    count_mask_cost: bool = True
    error_exponent: float = 2.0
    first_order: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "kinds", (self.kinds,) if isinstance(self.kinds, str) else tuple(self.kinds))
        for k in self.kinds:
            if k not in KINDS:
                raise RanapassError(f"unknown candidate kind {k!r}; expected a subset of {KINDS}")
        if isinstance(self.error_exponent, bool) or not (isinstance(self.error_exponent, (int, float))
                                                         and 0 < self.error_exponent < float("inf")):
            raise RanapassError(f"error_exponent must be a positive number, got {self.error_exponent!r}")
        if self.allocation not in ALLOCATIONS:
            raise RanapassError(f"allocation must be one of {sorted(ALLOCATIONS)}, got {self.allocation!r}")

    @classmethod
    def resolve(cls, options: PlanOptions | None, overrides: dict[str, Any]) -> PlanOptions:
        """``options`` (default: the defaults) with the fields named in ``overrides`` replaced."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise TypeError(f"unknown plan option(s) {unknown}; the options are {sorted(fields)}")
        return dataclasses.replace(options or cls(), **overrides)


def check_budget(budget: float) -> float:
    """A budget is a FLOP ratio in (0, 1]: any real number (Python, NumPy or a one-element tensor), not a bool.

    Returns it as a Python float.
    """
    value = budget
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise RanapassError(f"budget must be in (0, 1], got {budget!r}: a {type(budget).__name__}, not a number")
    value = float(value)
    if not 0.0 < value <= 1.0:
        raise RanapassError(f"budget must be in (0, 1], got {budget!r}")
    return value


class Planner:
    """Plans over one model's candidate sites; keeps what several plans share (allocation hulls)."""

    def __init__(self, model: torch.nn.Module, sites: list[Site], fingerprint: str, meta: dict[str, Any]):
        self.model = model
        self.sites = sites
        self.fingerprint = fingerprint
        self.meta = meta
        self._allocators: dict[tuple, tuple[Allocator, list]] = {}

    def dense_flops(self) -> float:
        """Dense FLOPs per token of the block linears."""
        return sum(u.dense_flops for s in self.sites for u in s.separate)

    def allocate(self, budget: float, options: PlanOptions) -> Chosen:
        """One option per unit under ``budget`` (adapted / dense FLOPs), by ``options.allocation``."""
        budget = check_budget(budget)
        return ALLOCATIONS[options.allocation](self, budget * self.dense_flops(), options)

    def plan(self, budget: float, options: PlanOptions, holdout: torch.Tensor | None) -> Plan:
        """Allocate, build the adapters and (``options.fit``) fit their thresholds on ``holdout``."""
        t0 = time.perf_counter()
        budget = check_budget(budget)
        chosen = self.allocate(budget, options)
        plan = self._build(chosen, budget, options.allocation)
        t_alloc = time.perf_counter() - t0
        if options.fit and holdout is not None and plan.adapted:
            fit_thresholds(self.model, plan, holdout)
            plan.meta["thresholds"] = f"fitted on {holdout.shape[0]} held-out calibration windows"
        else:
            plan.meta["thresholds"] = "calibration statistics"
        plan.meta.update({"allocation_seconds": round(t_alloc, 3),
                          "plan_seconds": round(time.perf_counter() - t0, 3), "kinds": list(options.kinds),
                          "grouping": options.grouping, "count_mask_cost": options.count_mask_cost,
                          "error_exponent": options.error_exponent, "first_order": options.first_order})
        log.info("planned budget %.3f (%s): expected ratio %.4f, %d/%d units adapted, %.2fs", budget,
                 options.allocation, plan.expected_ratio(), len(plan.adapted), len(plan.units),
                 time.perf_counter() - t0)
        return plan

    def predict(self, budget: float, options: PlanOptions) -> dict[str, float]:
        """The allocation's expected FLOP ratio and predicted error at ``budget`` (nothing built)."""
        budget = check_budget(budget)
        chosen = self.allocate(budget, options)
        cost = sum(u.candidate(o).cost for u, o in chosen)
        err = sum(u.candidate(o).error for u, o in chosen)
        return {"budget": budget, "expected_ratio": cost / self.dense_flops(), "predicted_error": err}

    def _allocator(self, kinds, grouping, count_mask_cost, exponent: float,
                   first_order_weight: float = 0.0) -> tuple[Allocator, list]:
        """The allocation problem for these settings: each candidate's objective is its error raised to
        ``exponent`` plus ``first_order_weight`` times its first-order loss change. The hulls are computed once
        per profile and settings when the weight is 0 (the weight changes with the budget)."""
        key = (kinds, grouping, count_mask_cost, exponent)
        if first_order_weight == 0.0 and key in self._allocators:
            return self._allocators[key]
        choices, index = [], []
        for site in self.sites:
            alts = site.alternatives(grouping)
            found = [[u.options(kinds, count_mask_cost=count_mask_cost) for u in alt] for alt in alts]
            choices.append(Choice([[Candidates(o.cost, o.error ** exponent + first_order_weight * o.first_order)
                                    for o in alt] for alt in found]))
            index.append((alts, [[o.keys for o in alt] for alt in found]))
        if first_order_weight == 0.0:
            self._allocators[key] = (Allocator(choices), index)
            return self._allocators[key]
        return Allocator(choices), index

    def first_order_weight(self, chosen: Chosen, options: PlanOptions) -> float:
        """The weight of the first-order term for ``options.first_order``: the objective's derivative at the mean
        error of the adapted units of ``chosen`` (``p * mean ** (p - 1)`` for exponent p), so that one nat of
        first-order change counts as one nat of error there. 0 when off, when the profile's errors are not
        in nats (no loss calibration), when no candidate has a first-order term, or when ``chosen``'s summed
        error is above ``FIRST_ORDER_MAX_KL``."""
        if not (options.first_order and isinstance(self.meta.get("loss_calibration"), dict)):
            return 0.0
        if not any(np.any(c.first_order) for s in self.sites for u in s.separate for c in u.curves.values()):
            return 0.0
        errors = [u.candidate(o).error for u, o in chosen if o[0] != "dense"]
        if not errors or sum(errors) > FIRST_ORDER_MAX_KL:
            return 0.0
        p = float(options.error_exponent)
        return p * float(np.mean(errors)) ** (p - 1)

    def _weights(self, unit: UnitCandidates) -> torch.Tensor:
        """The unit's stacked weight, (out, in) float32 whatever each member's layout, on the weights' device
        (the kinds build their adapters there and keep the results on the host)."""
        modules = [self.model.get_submodule(m) for m in unit.members]
        with onloaded(modules):
            return torch.cat([linear_module(module).weight.detach().float() for module in modules])

    def _build(self, chosen: list[tuple[UnitCandidates, tuple[str, int]]], budget: float, allocation: str) -> Plan:
        """The plan of the chosen options: each adapted unit's kind builds its adapter from its candidate."""
        units = []
        for unit, (kind, i) in chosen:
            adapter, kept, err = None, None, 0.0
            if kind != "dense":
                adapter = ADAPTER_KINDS[kind].from_candidate(unit, i, self._weights(unit))
                curve = unit.curves[kind]
                kept, err = float(curve.kept[i]), float(curve.error[i])
            units.append(UnitPlan(unit.name, unit.members, unit.out_features, unit.in_features, adapter, kept, err))
        order = {m: k for k, m in enumerate(m for s in self.sites for m in s.members)}
        units.sort(key=lambda u: order[u.members[0]])
        return Plan(units, budget, allocation, self.fingerprint, dict(self.meta))


# ---------------------------------------------------------------------------------------- strategies
def _allocate_global(planner: Planner, target: float, options: PlanOptions) -> Chosen:
    """One knapsack over every unit (cost_model/allocate.py), each site grouped or not as it fits best; with
    ``options.first_order``, solved again with the first-order term weighted at the first solution's errors."""
    setting = (options.kinds, options.grouping, options.count_mask_cost, float(options.error_exponent))
    chosen = _solve(*planner._allocator(*setting), target, planner, options)
    weight = planner.first_order_weight(chosen, options)
    if weight:
        chosen = _solve(*planner._allocator(*setting, weight), target, planner, options)
    return chosen


def _solve(allocator: Allocator, index: list, target: float, planner: Planner, options: PlanOptions) -> Chosen:
    try:
        result = allocator.solve(target)
    except InfeasibleBudgetError as e:
        raise RanapassError(f"budget {target / planner.dense_flops():.4f} is below the cheapest configuration "
                            f"the allowed kinds {list(options.kinds)} offer ({e})") from e
    chosen = []
    for (alts, opts), a, picks in zip(index, result.alternative, result.choice):
        chosen += [(u, uo[p]) for u, uo, p in zip(alts[a], opts[a], picks)]
    return chosen


def _allocate_uniform(planner: Planner, target: float, options: PlanOptions) -> Chosen:
    """The reference recipe (cost_model/uniform.py): one ratio per block for q/k/v and the MLP."""
    try:
        rho, chosen = allocate_reference(planner.sites, target, options.kinds, options.count_mask_cost)
    except InfeasibleBudgetError as e:
        raise RanapassError(f"uniform allocation cannot reach budget {target / planner.dense_flops():.4f}: {e}") from e
    log.info("uniform allocation: every adapted group keeps %.3f of its dense FLOPs", rho)
    return chosen


ALLOCATIONS: dict[str, Callable[[Planner, float, PlanOptions], Chosen]] = {
    "global": _allocate_global,
    "uniform": _allocate_uniform,
}
"""Allocation strategies by name: ``strategy(planner, target FLOPs per token, options) -> chosen options``."""
