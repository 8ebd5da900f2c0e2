"""Global allocation: one candidate per unit, minimising total error under a total-cost budget.

The problem is a multiple-choice knapsack::

    minimise  sum_u error_u(c_u)   subject to   sum_u cost_u(c_u) <= budget

solved by Lagrangian relaxation: for a multiplier lam every unit independently takes the candidate
minimising ``error + lam * cost`` (always a vertex of its lower convex hull), the total cost falls
as lam grows, and bisection finds the smallest lam that fits. The slack left at that breakpoint is
then filled greedily along the hulls (best error drop per unit of cost first). On the hull this is
exact; off-hull candidates are never chosen, which costs at most one hull step per unit.

A unit may offer *alternatives*: different ways to split it (for q/k/v: one grouped adapter, or
three separate ones). Each alternative is a list of parts, each part a list of candidates; for a
given lam the unit takes the alternative whose parts' Lagrangian values sum lowest.

Costs and errors are plain floats here; what they mean (FLOPs, parameters; weighted squared
error, discarded singular-value energy) is the caller's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

__all__ = ["Candidate", "Unit", "Allocation", "allocate", "InfeasibleBudgetError"]


class InfeasibleBudgetError(ValueError):
    """Even the cheapest candidate of every unit exceeds the budget."""


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One configuration of a part: its cost and its error (both additive across parts)."""

    cost: float
    error: float


@dataclasses.dataclass
class Unit:
    """A unit to allocate: one or more alternatives, each a list of parts, each a list of candidates."""

    alternatives: list[list[list[Candidate]]]

    @classmethod
    def simple(cls, candidates: Sequence[Candidate]) -> Unit:
        """A unit with a single way to configure it."""
        return cls([[list(candidates)]])


@dataclasses.dataclass
class Allocation:
    """Result: per unit, the chosen alternative and, per part, the index of the chosen candidate."""

    alternative: list[int]
    choice: list[list[int]]
    cost: float
    error: float
    lam: float


def _lower_hull(costs: np.ndarray, errors: np.ndarray) -> np.ndarray:
    """Indices of the lower convex hull of (cost, error), cheapest first, error strictly falling."""
    order = np.lexsort((errors, costs))
    hull: list[int] = []
    for i in order:
        if hull and costs[i] == costs[hull[-1]]:
            continue  # same cost, higher or equal error (lexsort)
        if hull and errors[i] >= errors[hull[-1]]:
            continue  # dearer and not better: never optimal
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b strictly above the segment a -> i is never optimal; points on it are kept (they fill budgets).
            if (errors[b] - errors[a]) * (costs[i] - costs[a]) > (errors[i] - errors[a]) * (costs[b] - costs[a]):
                hull.pop()
            else:
                break
        hull.append(int(i))
    return np.asarray(hull, dtype=np.int64)


class _Part:
    def __init__(self, candidates: Sequence[Candidate]):
        if not candidates:
            raise ValueError("every part needs at least one candidate")
        c = np.array([x.cost for x in candidates], dtype=np.float64)
        e = np.array([x.error for x in candidates], dtype=np.float64)
        if not (np.isfinite(c).all() and np.isfinite(e).all()):
            raise ValueError("candidate costs and errors must be finite")
        self.hull = _lower_hull(c, e)
        self.cost = c[self.hull]
        self.error = e[self.hull]

    def best(self, lam: float) -> int:
        """Position on the hull minimising error + lam * cost (ties: the cheaper)."""
        return int(np.argmin(self.error + lam * self.cost))


def allocate(units: Sequence[Unit], budget: float, *, iterations: int = 100) -> Allocation:
    """Choose one candidate per part (and one alternative per unit) minimising total error.

    Args:
        units: the units; every part must offer at least one candidate.
        budget: upper bound on the total cost.
        iterations: bisection steps on the multiplier.

    Raises:
        InfeasibleBudgetError: if the cheapest choices together exceed ``budget``.
    """
    parts = [[[_Part(p) for p in alt] for alt in u.alternatives] for u in units]

    def solve(lam: float) -> tuple[list[int], list[list[int]], float]:
        alts, picks, total = [], [], 0.0
        for u in parts:
            best = None
            for a, alt in enumerate(u):
                pos = [p.best(lam) for p in alt]
                value = sum(p.error[i] + lam * p.cost[i] for p, i in zip(alt, pos))
                if best is None or value < best[0]:
                    best = (value, a, pos)
            _, a, pos = best
            alts.append(a)
            picks.append(pos)
            total += sum(p.cost[i] for p, i in zip(u[a], pos))
        return alts, picks, total

    min_cost = sum(min(sum(p.cost[0] for p in alt) for alt in u) for u in parts)
    if min_cost > budget * (1 + 1e-12):
        raise InfeasibleBudgetError(f"the cheapest configuration costs {min_cost:.6g}, over the budget {budget:.6g}")

    lo, hi = 0.0, 1.0
    while solve(hi)[2] > budget:
        hi *= 4.0
        if hi > 1e300:
            raise InfeasibleBudgetError("no multiplier meets the budget")
    if solve(lo)[2] <= budget:
        hi = lo
    else:
        for _ in range(iterations):
            mid = 0.5 * (lo + hi)
            if solve(mid)[2] <= budget:
                hi = mid
            else:
                lo = mid
    alts, picks, total = solve(hi)

    # Fill the slack: step parts up their hulls, steepest error drop per cost first.
    while True:
        best = None
        for ui, (a, pos) in enumerate(zip(alts, picks)):
            for pi, (p, i) in enumerate(zip(parts[ui][a], pos)):
                if i + 1 < len(p.cost):
                    dc = p.cost[i + 1] - p.cost[i]
                    de = p.error[i] - p.error[i + 1]
                    if total + dc <= budget and (best is None or de / dc > best[0]):
                        best = (de / dc, ui, pi, dc)
        if best is None:
            break
        _, ui, pi, dc = best
        picks[ui][pi] += 1
        total += dc

    choice, error = [], 0.0
    for ui, (a, pos) in enumerate(zip(alts, picks)):
        alt = parts[ui][a]
        choice.append([int(p.hull[i]) for p, i in zip(alt, pos)])
        error += sum(p.error[i] for p, i in zip(alt, pos))
    return Allocation(alts, choice, total, error, hi)
