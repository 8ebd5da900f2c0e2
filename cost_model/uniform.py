"""Uniform allocation: the RaNA reference code's behaviour, kept as a baseline for global allocation.

The reference gives every Transformer block the same prune ratio: the attention input (q/k/v as one
rank adapter) and the MLP (up/gate rank adapters, down a neuron adapter, the FLOPs split between them
by a search that minimises the MLP's error) each keep the same fraction rho of their dense FLOPs,
and o_proj stays dense. Here each block's groups are solved exactly with the same knapsack as the
global allocator, restricted to their own FLOPs ``rho * dense``; rho is set by bisection so the
whole model meets the budget.

``allocate_reference`` derives those groups from a profile's sites; ``allocate_uniform`` solves them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ranapass.cost_model.allocate import Candidates, Choice, InfeasibleBudgetError, allocate

if TYPE_CHECKING:
    from ranapass.candidates import Site, UnitCandidates

__all__ = ["UniformGroup", "allocate_uniform", "allocate_reference"]


@dataclasses.dataclass
class UniformGroup:
    """Units that share one ratio (a block's attention input, or its MLP).

    Each entry of ``units`` is one unit's candidates; ``dense_cost`` is the group's dense FLOPs.
    """

    units: list[Candidates]
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
                a = allocate([Choice.simple(c) for c in g.units], rho * g.dense_cost)
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


def _block_of(path: str) -> str:
    """The block a module belongs to: its path up to the last numeric component (``model.layers.3``)."""
    parts = path.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].isdigit():
            return ".".join(parts[: i + 1])
    return ""


def allocate_reference(sites: Sequence[Site], target: float, kinds: tuple[str, ...], count_mask_cost: bool
                       ) -> tuple[float, list[tuple[UnitCandidates, tuple[str, int]]]]:
    """The reference recipe over a profile's sites, within ``target`` FLOPs per token.

    Derived from the structure: per block, the first site read (the attention input: q/k/v, stacked)
    and the MLP (units wider out than in: rank; narrower: neuron) share one ratio; square linears
    (o_proj) stay dense. ``kinds`` may narrow rank units to "lowrank"; with "lowrank" alone (static
    low rank, no masks) narrow units take low rank too, or stay dense.

    Returns:
        the common ratio rho, and per unit its chosen option (see ``UnitCandidates.options``).

    Raises:
        InfeasibleBudgetError: no ratio meets ``target``.
    """
    rank_kinds = ("lowrank",) if "lowrank" in kinds and "rank" not in kinds else ("rank",)
    narrow = rank_kinds if kinds == ("lowrank",) else ("neuron",)
    blocks: dict[str, list[Site]] = {}
    for site in sites:
        blocks.setdefault(_block_of(site.members[0]), []).append(site)
    groups, members, fixed, dense_chosen = [], [], 0.0, []
    for block in blocks.values():
        attention, mlp = [], []
        for i, site in enumerate(block):
            if i == 0 and site.stacked is not None:
                attention.append((site.stacked, rank_kinds))
                continue
            for u in site.separate:
                m, n = sum(u.out_features), u.in_features
                unit_kinds = rank_kinds if m > n else narrow
                if m == n or not u.options(unit_kinds, dense=False).keys:  # no candidate of these kinds
                    fixed += u.dense_flops
                    dense_chosen.append(u)
                elif i == 0:
                    attention.append((u, unit_kinds))
                else:
                    mlp.append((u, unit_kinds))
        for group in (attention, mlp):
            if group:
                found = [u.options(k, dense=False, count_mask_cost=count_mask_cost) for u, k in group]
                opts = [o.keys for o in found]
                groups.append(UniformGroup([o.candidates() for o in found], sum(u.dense_flops for u, _ in group)))
                members.append([(u, uo) for (u, _), uo in zip(group, opts)])
    rho, picks = allocate_uniform(groups, fixed, target)
    chosen = [(u, ("dense", -1)) for u in dense_chosen]
    for group, pick in zip(members, picks):
        chosen += [(u, uo[p]) for (u, uo), p in zip(group, pick)]
    return rho, chosen
