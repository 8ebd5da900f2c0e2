"""Global allocation: one candidate per choice, minimising total error under a total-cost budget.

The problem is a multiple-choice knapsack::

    minimise  sum_c error_c(x_c)   subject to   sum_c cost_c(x_c) <= budget

solved by Lagrangian relaxation: for a multiplier lam every choice independently takes the candidate
minimising ``error + lam * cost`` (always a vertex of its lower convex hull), the total cost falls
as lam grows, and bisection finds the smallest lam that fits. The slack left at that breakpoint is
then filled greedily along the hulls (best error drop per unit of cost first). On the hull this is
exact; off-hull candidates are never chosen, which costs at most one hull step per choice.

A ``Choice`` may offer *alternatives*: different ways to split what it configures (for q/k/v: one
grouped adapter, or three separate ones). Each alternative is a list of parts, each part a list of
candidates; for a given lam the choice takes the alternative whose parts' Lagrangian values sum lowest.

Costs and errors are plain floats here; what they mean (FLOPs, parameters; weighted squared
error, discarded singular-value energy) is the caller's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

__all__ = ["Candidate", "Candidates", "Choice", "Allocation", "Allocator", "allocate", "InfeasibleBudgetError"]


class InfeasibleBudgetError(ValueError):
    """Even the cheapest candidate of every choice exceeds the budget."""


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One configuration of a part: its cost and its error (both additive across parts)."""

    cost: float
    error: float


@dataclasses.dataclass(frozen=True)
class Candidates:
    """A part's candidates as two parallel arrays: what large problems pass instead of ``Candidate`` lists
    (building hundreds of thousands of small objects costs more than solving)."""

    cost: np.ndarray
    error: np.ndarray

    @classmethod
    def of(cls, part: Candidates | Sequence[Candidate]) -> Candidates:
        """``part`` as arrays (float64, one entry per candidate)."""
        if isinstance(part, Candidates):
            return cls(np.asarray(part.cost, dtype=np.float64), np.asarray(part.error, dtype=np.float64))
        return cls(np.array([x.cost for x in part], dtype=np.float64),
                   np.array([x.error for x in part], dtype=np.float64))

    def __len__(self) -> int:
        return len(self.cost)


Part = Candidates | Sequence[Candidate]
"""One part's candidates: a list of ``Candidate`` or their arrays."""


@dataclasses.dataclass
class Choice:
    """One decision of the allocator: one or more alternatives, each a list of parts, each holding
    candidates. The allocator picks one alternative, then one candidate for each of its parts."""

    alternatives: list[list[Part]]

    @classmethod
    def simple(cls, candidates: Part) -> Choice:
        """A choice with a single alternative of a single part: pick one of ``candidates``."""
        return cls([[candidates if isinstance(candidates, Candidates) else list(candidates)]])


@dataclasses.dataclass
class Allocation:
    """Result: per choice, the chosen alternative and, per part, the index of the chosen candidate."""

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


class Allocator:
    """The hulls of a set of choices, computed once; ``solve(budget)`` for as many budgets as needed."""

    def __init__(self, choices: Sequence[Choice]):
        costs, errors, hulls, part_alt, alt_choice = [], [], [], [], []
        for ci, choice in enumerate(choices):
            if not choice.alternatives:
                raise ValueError("every choice needs at least one alternative")
            for alt in choice.alternatives:
                for part in alt:
                    if not len(part):
                        raise ValueError("every part needs at least one candidate")
                    arrays = Candidates.of(part)
                    c, e = arrays.cost, arrays.error
                    if c.shape != e.shape or c.ndim != 1:
                        raise ValueError(f"a part's costs and errors must be 1-d and equally long, got {c.shape} "
                                         f"and {e.shape}")
                    if not (np.isfinite(c).all() and np.isfinite(e).all()):
                        raise ValueError("candidate costs and errors must be finite")
                    h = _lower_hull(c, e)
                    hulls.append(h)
                    costs.append(c[h])
                    errors.append(e[h])
                    part_alt.append(len(alt_choice))
                alt_choice.append(ci)
        width = max(len(h) for h in hulls)
        self.cost = np.zeros((len(hulls), width))
        self.error = np.full((len(hulls), width), np.inf)
        for i, (c, e) in enumerate(zip(costs, errors)):
            self.cost[i, :len(c)] = c
            self.error[i, :len(e)] = e
            self.cost[i, len(c):] = c[-1]
        self.length = np.array([len(h) for h in hulls])
        self.hulls = hulls
        self.part_alt = np.array(part_alt)
        self.alt_choice = np.array(alt_choice)
        self.num_choices = len(choices)
        self.num_alts = len(alt_choice)

    def _choose(self, lam: float) -> tuple[np.ndarray, np.ndarray, float]:
        """Per part the hull position minimising error + lam * cost; per choice the best alternative."""
        value = self.error + lam * self.cost
        pos = np.argmin(value, axis=1)
        best = value[np.arange(len(pos)), pos]
        alt_value = np.bincount(self.part_alt, weights=best, minlength=self.num_alts)
        # lexicographic: choice, then value -> the first alternative of each choice is its best
        order = np.lexsort((alt_value, self.alt_choice))
        first = np.ones(len(order), dtype=bool)
        first[1:] = self.alt_choice[order][1:] != self.alt_choice[order][:-1]
        chosen_alt = np.zeros(self.num_alts, dtype=bool)
        chosen_alt[order[first]] = True
        active = chosen_alt[self.part_alt]
        cost = float(self.cost[np.arange(len(pos)), pos][active].sum())
        return pos, active, cost

    def solve(self, budget: float, *, iterations: int = 100) -> Allocation:
        """Choose one candidate per part (and one alternative per choice) minimising total error.

        Raises:
            InfeasibleBudgetError: if the cheapest choices together exceed ``budget``.
        """
        min_alt = np.bincount(self.part_alt, weights=self.cost[:, 0], minlength=self.num_alts)
        min_cost = float(sum(min_alt[self.alt_choice == c].min() for c in range(self.num_choices)))
        if min_cost > budget * (1 + 1e-12):
            raise InfeasibleBudgetError(f"the cheapest configuration costs {min_cost:.6g}, over the budget {budget:.6g}")
        lo, hi = 0.0, 1.0
        while self._choose(hi)[2] > budget:
            hi *= 4.0
            if hi > 1e300:
                raise InfeasibleBudgetError("no multiplier meets the budget")
        if self._choose(lo)[2] <= budget:
            hi = lo
        else:
            for _ in range(iterations):
                mid = 0.5 * (lo + hi)
                if self._choose(mid)[2] <= budget:
                    hi = mid
                else:
                    lo = mid
        pos, active, total = self._choose(hi)
        rows = np.flatnonzero(active)
        # Fill the slack: step parts up their hulls, steepest error drop per cost first.
        while True:
            nxt = np.minimum(pos[rows] + 1, self.length[rows] - 1)
            dc = self.cost[rows, nxt] - self.cost[rows, pos[rows]]
            de = self.error[rows, pos[rows]] - self.error[rows, nxt]
            ok = (nxt > pos[rows]) & (total + dc <= budget) & (dc > 0)
            if not ok.any():
                break
            slope = np.where(ok, de / np.where(dc > 0, dc, 1.0), -np.inf)
            k = int(np.argmax(slope))
            pos[rows[k]] += 1
            total += float(dc[k])
        alternative, choice, error = [], [], 0.0
        for c in range(self.num_choices):
            alts = np.flatnonzero(self.alt_choice == c)
            a = next(i for i, al in enumerate(alts) if active[self.part_alt == al].any())
            parts = np.flatnonzero(self.part_alt == alts[a])
            alternative.append(a)
            choice.append([int(self.hulls[p][pos[p]]) for p in parts])
            error += float(sum(self.error[p, pos[p]] for p in parts))
        return Allocation(alternative, choice, total, error, hi)


def allocate(choices: Sequence[Choice], budget: float, *, iterations: int = 100) -> Allocation:
    """Choose one candidate per part (and one alternative per choice) minimising total error.

    Args:
        choices: the choices; every part must offer at least one candidate.
        budget: upper bound on the total cost.
        iterations: bisection steps on the multiplier.

    Raises:
        InfeasibleBudgetError: if the cheapest choices together exceed ``budget``.
    """
    return Allocator(choices).solve(budget, iterations=iterations)
