"""Uniform allocation: the RaNA reference code's behaviour, kept as a baseline for global allocation.

The reference gives every Transformer block the same prune ratio: the attention input (q/k/v as one
rank adapter) and the MLP (up/gate rank adapters, down a neuron adapter, the FLOPs split between them
by a search that minimises the MLP's error) each keep the same fraction rho of their dense FLOPs,
and o_proj stays dense. Here each block's groups are solved exactly with the same knapsack as the
global allocator, restricted to their own FLOPs ``rho * dense``; rho is set by bisection so the
whole model meets the budget.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ranapass.cost_model.allocate import Candidate, InfeasibleBudgetError, Unit, allocate

__all__ = ["UniformGroup", "allocate_uniform"]


@dataclasses.dataclass
class UniformGroup:
    """Units that share one ratio (a block's attention input, or its MLP).

    Each entry of ``units`` is one unit's candidates; ``dense_cost`` is the group's dense FLOPs.
    """

    units: list[list[Candidate]]
    dense_cost: float


def allocate_uniform(groups: Sequence[UniformGroup], fixed_cost: float, budget: float,
                     iterations: int = 40) -> tuple[float, list[list[int]]]:
    """Largest common ratio rho whose per-group optima fit ``budget`` (with ``fixed_cost`` for dense units).

    Returns:
        rho and, per group, the chosen candidate index of each unit.
    """

    def solve(rho: float) -> tuple[float, list[list[int]]] | None:
        total, picks = fixed_cost, []
        for g in groups:
            try:
                a = allocate([Unit.simple(c) for c in g.units], rho * g.dense_cost)
            except InfeasibleBudgetError:
                return None
            total += a.cost
            picks.append([c[0] for c in a.choice])
        return total, picks

    lo, hi = 0.0, 1.0
    best = solve(hi)
    if best is not None and best[0] <= budget:
        return hi, best[1]
    found = None
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        res = solve(mid)
        if res is not None and res[0] <= budget:
            lo, found = mid, res
        else:
            hi = mid
    if found is None:
        raise InfeasibleBudgetError(f"uniform allocation cannot meet budget {budget:.6g} "
                                    f"(dense units alone cost {fixed_cost:.6g})")
    return lo, found[1]
