"""The global allocator: optimal on the hull, budget respected, alternatives, infeasible budgets."""

import itertools
import random

import pytest

import numpy as np

from ranapass.cost_model.allocate import Candidate, Candidates, Choice, InfeasibleBudgetError, _lower_hull, allocate
from ranapass.cost_model.uniform import UniformGroup, allocate_uniform


def _convex_units(rng, count):
    """Units whose candidates already lie on convex curves (error falls ever more slowly with cost)."""
    units = []
    for _ in range(count):
        steps = sorted(rng.uniform(0.1, 3.0) for _ in range(rng.randint(2, 5)))[::-1]
        cost, err, cands = rng.uniform(0, 2), sum(steps), []
        cands.append(Candidate(cost, err))
        for s in steps:
            cost += rng.uniform(0.5, 2)
            err -= s
            cands.append(Candidate(cost, max(err, 0.0)))
        units.append(Choice.simple(cands))
    return units


def _largest_hull_step(cands):
    costs, errors = np.array([c.cost for c in cands]), np.array([c.error for c in cands])
    hull = errors[_lower_hull(costs, errors)]
    return float(max(hull[:-1] - hull[1:], default=0.0))


def _brute_force(units, budget):
    lists = [u.alternatives[0][0] for u in units]
    best = None
    for combo in itertools.product(*lists):
        cost = sum(c.cost for c in combo)
        if cost <= budget + 1e-9:
            err = sum(c.error for c in combo)
            best = err if best is None or err < best else best
    return best


def test_matches_brute_force_within_one_hull_step():
    """Lagrangian + greedy fill is exact up to the last hull segment it could not afford."""
    rng = random.Random(0)
    for _ in range(150):
        units = _convex_units(rng, 3)
        budget = rng.uniform(2, 15)
        try:
            result = allocate(units, budget)
        except InfeasibleBudgetError:
            assert _brute_force(units, budget) is None
            continue
        best = _brute_force(units, budget)
        assert result.cost <= budget + 1e-9
        max_step = max(_largest_hull_step(u.alternatives[0][0]) for u in units)
        assert result.error <= best + max_step + 1e-9


def test_spends_budget_on_the_steepest_units():
    flat = Choice.simple([Candidate(0, 1.0), Candidate(10, 0.9)])
    steep = Choice.simple([Candidate(0, 1.0), Candidate(10, 0.0)])
    result = allocate([flat, steep], 10)
    assert result.choice == [[0], [1]] and result.cost == 10


def test_lower_hull_drops_dominated_and_concave_points():
    costs = np.array([0, 1, 2, 3, 3, 5.0])
    errors = np.array([10, 9.5, 5, 4, 6, 3.9])
    assert list(_lower_hull(costs, errors)) == [0, 2, 3, 5]
    # collinear points stay: they are the budget-filling steps of a straight trade-off
    assert list(_lower_hull(np.arange(4.0), 3 - np.arange(4.0))) == [0, 1, 2, 3]


def test_alternatives_pick_the_better_split():
    # One grouped adapter (cheap and good) against two separate ones.
    qkv = Choice([[[Candidate(0, 2.0), Candidate(4, 0.1)]],
                  [[Candidate(0, 1.0), Candidate(4, 0.5)], [Candidate(0, 1.0), Candidate(4, 0.5)]]])
    result = allocate([qkv], 4)
    assert result.alternative == [0] and result.choice == [[1]]
    result = allocate([qkv], 0)
    assert result.error == 2.0


def test_array_parts_allocate_as_candidate_lists():
    rng = random.Random(3)
    units = _convex_units(rng, 12)
    as_arrays = [Choice.simple(Candidates.of(u.alternatives[0][0])) for u in units]
    cheapest = sum(u.alternatives[0][0][0].cost for u in units)
    dearest = sum(u.alternatives[0][0][-1].cost for u in units)
    for budget in np.linspace(cheapest, dearest, 5):
        lists, arrays = allocate(units, budget), allocate(as_arrays, budget)
        assert (lists.choice, lists.cost, lists.error) == (arrays.choice, arrays.cost, arrays.error)
    with pytest.raises(ValueError, match="equally long"):
        allocate([Choice.simple(Candidates(np.zeros(3), np.zeros(2)))], 4)


def test_infeasible_budget_is_an_error():
    with pytest.raises(InfeasibleBudgetError, match="cheapest"):
        allocate([Choice.simple([Candidate(5, 0)])], 4)
    with pytest.raises(ValueError, match="finite"):
        allocate([Choice.simple([Candidate(float("nan"), 0)])], 4)


def test_uniform_gives_every_group_the_same_ratio():
    cands = [Candidate(c, 10 - c) for c in range(11)]
    groups = [UniformGroup([cands], 10), UniformGroup([cands, cands], 20)]
    rho, picks = allocate_uniform(groups, fixed_cost=5, budget=5 + 0.5 * 30)
    assert 0.5 <= rho < 0.55  # integer costs: any rho in [0.5, 0.55) gives the same choices
    assert picks[0] == [5] and sum(picks[1]) == 10
    with pytest.raises(InfeasibleBudgetError):
        allocate_uniform(groups, fixed_cost=5, budget=4)
