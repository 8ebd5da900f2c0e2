"""``ranapass.profile``: calibrate once, then answer budget questions instantly.

A ``Profile`` holds, for every unit a model could adapt, its candidate configurations with expected
FLOPs and error (cost_model/curves.py) and the rank-adapter bases. ``Profile.plan(budget)`` runs the
allocator over them (no recalibration), builds the adapters from the model's weights and, by default,
re-fits the thresholds on held-out calibration windows so that measured FLOPs land on the budget.

Units: linears that read one input tensor form a *site*. A multi-member site (q/k/v, gate/up) can be
adapted as one stacked rank adapter (one B and one mask) or member by member; the allocator picks
whichever is better for each site. Every unit may also stay dense or become a neuron adapter.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ranapass.adapters import ADAPTER_KINDS
from ranapass.attach import temporarily_attached
from ranapass.cache import cache_dir
from ranapass.calibrate import RANK_MIN_ASPECT, CalibrationStats, SiteStats, candidate_linears, collect
from ranapass.cost_model import flops as F
from ranapass.cost_model.allocate import Allocator, Candidate, InfeasibleBudgetError, Unit
from ranapass.cost_model.curves import Curve, neuron_curve, rank_curve, static_rank_curve
from ranapass.cost_model.decompose import gram_factor, output_pca, weight_svd
from ranapass.cost_model.uniform import UniformGroup, allocate_uniform
from ranapass.fingerprint import weights_fingerprint
from ranapass.plan import Plan, PlanMismatchError, UnitPlan
from ranapass.thresholds import fit_thresholds

__all__ = ["ProfileOptions", "UnitCandidates", "Site", "Profile", "profile"]

log = logging.getLogger(__name__)

PROFILE_VERSION = 1
KINDS = ("rank", "lowrank", "neuron")
"""Candidate families: rank adapters (masked or not), static low rank only (no mask), neuron adapters."""


@dataclasses.dataclass(frozen=True)
class ProfileOptions:
    """How to calibrate.

    Args:
        batch_size: windows per forward pass.
        sample_tokens: input rows sampled per site for the candidate curves.
        holdout_windows: calibration windows kept out of the statistics, used to fit thresholds.
        error_weighting: "fisher" (output-gradient weighted error, needs a loss) or "relative"
            (each unit's error relative to its output energy).
        gradient_windows: windows of the backward pass for "fisher".
        exclude: module paths never adapted (the output embedding always is).
        rank_min_aspect: offer rank adapters only for units with out >= aspect * in (0: everywhere).
        seed: seed of the sampling.
    """

    batch_size: int = 4
    sample_tokens: int = 2048
    holdout_windows: int = 2
    error_weighting: str = "fisher"
    gradient_windows: int = 16
    exclude: tuple[str, ...] = ()
    rank_min_aspect: float = RANK_MIN_ASPECT
    seed: int = 0

    def __post_init__(self) -> None:
        if self.error_weighting not in ("fisher", "relative"):
            raise ValueError(f"error_weighting must be 'fisher' or 'relative', got {self.error_weighting!r}")
        for name in ("batch_size", "sample_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.holdout_windows < 0 or self.gradient_windows < 0:
            raise ValueError("holdout_windows and gradient_windows must be >= 0")
        object.__setattr__(self, "exclude", tuple(self.exclude))


@dataclasses.dataclass
class UnitCandidates:
    """One unit (a single linear, or a stack of linears sharing an input) and its candidate curves."""

    name: str
    members: tuple[str, ...]
    out_features: tuple[int, ...]
    in_features: int
    curves: dict[str, Curve]
    basis: torch.Tensor | None = None  # [m, r] output principal axes, for rank adapters

    @property
    def dense_flops(self) -> float:
        return F.per_token(F.dense_linear(sum(self.out_features), self.in_features))

    def options(self, kinds: Sequence[str], dense: bool = True,
                count_mask_cost: bool = True) -> tuple[list[tuple[str, int]], list[Candidate]]:
        """The allowed candidates: their ``(curve kind, index)`` ("dense", -1 first when allowed) and costs.

        "rank" allows every rank-adapter candidate (masked or not), "lowrank" only the unmasked ones.
        ``count_mask_cost=False`` leaves the masks' FLOPs out of the costs (an ablation).
        """
        options = [("dense", -1)] if dense else []
        cands = [Candidate(self.dense_flops, 0.0)] if dense else []
        for kind in ("rank", "neuron"):
            curve = self.curves.get(kind)
            wanted = [k for k in kinds if (k == "lowrank" and kind == "rank") or k == kind]
            if curve is None or not wanted:
                continue
            idx = np.arange(len(curve)) if kind in wanted else np.flatnonzero(curve.tau == 0)
            cost = curve.flops[idx] - (0.0 if count_mask_cost else F.MASK_FLOPS_PER_SCORE * curve.rank[idx])
            options += [(kind, i) for i in idx.tolist()]
            cands += [Candidate(c, e) for c, e in zip(cost.tolist(), curve.error[idx].tolist())]
        return options, cands

    def candidate(self, option: tuple[str, int]) -> Candidate:
        """Cost (FLOPs per token, masks included) and error of one option."""
        kind, i = option
        if kind == "dense":
            return Candidate(self.dense_flops, 0.0)
        c = self.curves[kind]
        return Candidate(float(c.flops[i]), float(c.error[i]))


@dataclasses.dataclass
class Site:
    """Linears reading one input: the stacked unit (if several members) and the per-member units."""

    members: tuple[str, ...]
    stacked: UnitCandidates | None
    separate: list[UnitCandidates]

    def alternatives(self, grouping: bool) -> list[list[UnitCandidates]]:
        alts = [self.separate]
        if grouping and self.stacked is not None:
            alts.insert(0, [self.stacked])
        return alts


def _stack_name(members: Sequence[str]) -> str:
    prefix = os.path.commonprefix([m.rsplit(".", 1)[0] + "." for m in members])
    if not prefix.endswith("."):
        prefix = prefix[: prefix.rfind(".") + 1]
    return prefix + "{" + ",".join(m[len(prefix):] for m in members) + "}"


class Profile:
    """Calibration result for one model: candidate curves per unit, ready for budget queries.

    Holds a reference to the model (plans take the weights from it).
    """

    def __init__(self, model: torch.nn.Module, sites: list[Site], *, holdout: torch.Tensor | None,
                 fingerprint: str, meta: dict[str, Any]):
        self.model = model
        self.sites = sites
        self.holdout = holdout
        self.fingerprint = fingerprint
        self.meta = meta
        self._allocators: dict[tuple, tuple[Allocator, list]] = {}

    # ------------------------------------------------------------------ queries
    @property
    def units(self) -> list[UnitCandidates]:
        """Every unit (stacked and per-member)."""
        return [u for s in self.sites for u in ([s.stacked] if s.stacked else []) + s.separate]

    def dense_flops(self) -> float:
        """Dense FLOPs per token of the block linears."""
        return sum(u.dense_flops for s in self.sites for u in s.separate)

    def plan(self, budget: float, *, allocation: str = "global", kinds: Sequence[str] = ("rank", "neuron"),
             grouping: bool = True, fit: bool = True, count_mask_cost: bool = True) -> Plan:
        """Allocate under ``budget`` (adapted / dense FLOPs of the block linears) and build the plan.

        Args:
            budget: in (0, 1].
            allocation: "global" (one knapsack over every unit) or "uniform" (the reference's recipe:
                same ratio per block for q/k/v and the MLP, o_proj dense).
            kinds: candidate families allowed for "global": any of "rank" (rank adapters, masked or
                not), "lowrank" (static low rank only, no mask) and "neuron".
            grouping: let multi-member sites use one stacked rank adapter.
            fit: re-fit thresholds on the held-out calibration windows (needs them; see ``holdout``).
            count_mask_cost: charge the masks' compare/select FLOPs during allocation (the reference
                code does not; an ablation). Reported FLOPs always include them.

        Example::

            plan = profile.plan(budget=0.56)
            print(plan.summary())
        """
        _check_budget(budget)
        t0 = time.perf_counter()
        chosen = self._allocate(budget, allocation, tuple(kinds), grouping, count_mask_cost)
        plan = self._build(chosen, budget, allocation)
        t_alloc = time.perf_counter() - t0
        if fit and self.holdout is not None and plan.adapted:
            fit_thresholds(self.model, plan, self.holdout)
            plan.meta["thresholds"] = f"fitted on {self.holdout.shape[0]} held-out calibration windows"
        else:
            plan.meta["thresholds"] = "calibration statistics"
        plan.meta.update({"allocation_seconds": round(t_alloc, 3), "kinds": list(kinds), "grouping": grouping,
                          "count_mask_cost": count_mask_cost})
        log.info("planned budget %.3f (%s): expected ratio %.4f, %d/%d units adapted, %.2fs", budget, allocation,
                 plan.expected_ratio(), len(plan.adapted), len(plan.units), time.perf_counter() - t0)
        return plan

    def curve(self, budgets: Sequence[float], **plan_kwargs: Any) -> list[dict[str, float]]:
        """Predicted error against budget: ``[{budget, expected_ratio, predicted_error}, ...]`` (no fitting)."""
        out = []
        for b in budgets:
            _check_budget(b)
            chosen = self._allocate(b, plan_kwargs.get("allocation", "global"),
                                    tuple(plan_kwargs.get("kinds", ("rank", "neuron"))), plan_kwargs.get("grouping", True),
                                    plan_kwargs.get("count_mask_cost", True))
            cost = sum(u.candidate(o).cost for u, o in chosen)
            err = sum(u.candidate(o).error for u, o in chosen)
            out.append({"budget": b, "expected_ratio": cost / self.dense_flops(), "predicted_error": err})
        return out

    # ------------------------------------------------------------------ allocation
    def _allocate(self, budget: float, allocation: str, kinds: tuple[str, ...], grouping: bool,
                  count_mask_cost: bool = True) -> list[tuple[UnitCandidates, tuple[str, int]]]:
        for k in kinds:
            if k not in KINDS:
                raise ValueError(f"unknown candidate kind {k!r}; expected a subset of {KINDS}")
        target = budget * self.dense_flops()
        if allocation == "global":
            return self._allocate_global(target, kinds, grouping, count_mask_cost)
        if allocation == "uniform":
            return self._allocate_uniform(target, kinds, count_mask_cost)
        raise ValueError(f"allocation must be 'global' or 'uniform', got {allocation!r}")

    def _allocator(self, kinds, grouping, count_mask_cost) -> tuple[Allocator, list]:
        """The allocation problem for these settings (hulls computed once per profile and settings)."""
        key = (kinds, grouping, count_mask_cost)
        if key not in self._allocators:
            units, index = [], []
            for site in self.sites:
                alts = site.alternatives(grouping)
                found = [[u.options(kinds, count_mask_cost=count_mask_cost) for u in alt] for alt in alts]
                units.append(Unit([[cands for _, cands in alt] for alt in found]))
                index.append((alts, [[opts for opts, _ in alt] for alt in found]))
            self._allocators[key] = (Allocator(units), index)
        return self._allocators[key]

    def _allocate_global(self, target, kinds, grouping, count_mask_cost):
        allocator, index = self._allocator(kinds, grouping, count_mask_cost)
        try:
            result = allocator.solve(target)
        except InfeasibleBudgetError as e:
            raise ValueError(f"budget {target / self.dense_flops():.4f} is below the cheapest configuration "
                             f"the allowed kinds {list(kinds)} offer ({e})") from e
        chosen = []
        for (alts, opts), a, picks in zip(index, result.alternative, result.choice):
            chosen += [(u, uo[p]) for u, uo, p in zip(alts[a], opts[a], picks)]
        return chosen

    def _allocate_uniform(self, target, kinds, count_mask_cost):
        """Reference recipe, derived from the structure: per block, the first site read (the attention
        input: q/k/v, stacked) and the MLP (units wider out than in: rank; narrower: neuron) share one
        ratio; square linears (o_proj) stay dense. ``kinds`` may narrow rank units to "lowrank"; with
        "lowrank" alone (static low rank, no masks) narrow units take low rank too, or stay dense."""
        rank_kinds = ("lowrank",) if "lowrank" in kinds and "rank" not in kinds else ("rank",)
        narrow = rank_kinds if kinds == ("lowrank",) else ("neuron",)
        blocks: dict[str, list[Site]] = {}
        for site in self.sites:
            blocks.setdefault(_block_of(site.members[0]), []).append(site)
        groups, members, fixed, dense_chosen = [], [], 0.0, []
        for sites in blocks.values():
            attention, mlp = [], []
            for i, site in enumerate(sites):
                if i == 0 and site.stacked is not None:
                    attention.append((site.stacked, rank_kinds))
                    continue
                for u in site.separate:
                    m, n = sum(u.out_features), u.in_features
                    unit_kinds = rank_kinds if m > n else narrow
                    if m == n or not u.options(unit_kinds, dense=False)[1]:  # no candidate of these kinds
                        fixed += u.dense_flops
                        dense_chosen.append(u)
                    elif i == 0:
                        attention.append((u, unit_kinds))
                    else:
                        mlp.append((u, unit_kinds))
            for group in (attention, mlp):
                if group:
                    found = [u.options(k, dense=False, count_mask_cost=count_mask_cost) for u, k in group]
                    opts = [o for o, _ in found]
                    groups.append(UniformGroup([c for _, c in found],
                                               sum(u.dense_flops for u, _ in group)))
                    members.append([(u, uo) for (u, _), uo in zip(group, opts)])
        try:
            rho, picks = allocate_uniform(groups, fixed, target)
        except InfeasibleBudgetError as e:
            raise ValueError(f"uniform allocation cannot reach budget {target / self.dense_flops():.4f}: {e}") from e
        log.info("uniform allocation: every adapted group keeps %.3f of its dense FLOPs", rho)
        chosen = [(u, ("dense", -1)) for u in dense_chosen]
        for group, pick in zip(members, picks):
            chosen += [(u, uo[p]) for (u, uo), p in zip(group, pick)]
        return chosen

    # ------------------------------------------------------------------ building plans
    def _weights(self, unit: UnitCandidates) -> torch.Tensor:
        return torch.cat([self.model.get_submodule(m).weight.detach().float().cpu() for m in unit.members])

    def _build(self, chosen: list[tuple[UnitCandidates, tuple[str, int]]], budget: float, allocation: str) -> Plan:
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

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write the profile (curves, bases, held-out windows) into directory ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        sites = []
        for si, site in enumerate(self.sites):
            entry = {"members": list(site.members), "stacked": None, "separate": []}
            for key, unit in [("stacked", site.stacked)] + [("separate", u) for u in site.separate]:
                if unit is None:
                    continue
                uid = f"{si}.{len(entry['separate']) if key == 'separate' else 's'}"
                doc = {"name": unit.name, "members": list(unit.members), "out_features": list(unit.out_features),
                       "in_features": unit.in_features, "curves": sorted(unit.curves), "uid": uid}
                for kind, curve in unit.curves.items():
                    for field, arr in curve.arrays().items():
                        tensors[f"{uid}.{kind}.{field}"] = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float64))
                if unit.basis is not None:
                    tensors[f"{uid}.basis"] = unit.basis.contiguous()
                if key == "stacked":
                    entry["stacked"] = doc
                else:
                    entry["separate"].append(doc)
            sites.append(entry)
        if self.holdout is not None:
            tensors["holdout"] = self.holdout.contiguous()
        save_file(tensors, str(path / "profile.safetensors"))
        doc = {"_type": "ranapass.Profile", "_version": PROFILE_VERSION, "fingerprint": self.fingerprint,
               "meta": self.meta, "sites": sites}
        (path / "profile.json").write_text(json.dumps(doc, indent=1))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model: torch.nn.Module, *, check_fingerprint: bool = True) -> Profile:
        """Read a profile written by ``save`` for ``model`` (whose weights must match)."""
        path = Path(path)
        doc = json.loads((path / "profile.json").read_text())
        if doc.get("_type") != "ranapass.Profile" or doc.get("_version") != PROFILE_VERSION:
            raise ValueError(f"{path} is not a ranapass profile of version {PROFILE_VERSION}: profile again")
        if check_fingerprint and weights_fingerprint(model) != doc["fingerprint"]:
            raise PlanMismatchError(f"profile {path} was made for other weights: profile this model")
        tensors = load_file(str(path / "profile.safetensors"))

        def unit(d):
            curves = {k: Curve(k, *(tensors[f"{d['uid']}.{k}.{f}"].numpy() for f in
                                    ("rank", "tau", "kept", "flops", "error"))) for k in d["curves"]}
            return UnitCandidates(d["name"], tuple(d["members"]), tuple(d["out_features"]), d["in_features"],
                                  curves, tensors.get(f"{d['uid']}.basis"))

        sites = [Site(tuple(s["members"]), unit(s["stacked"]) if s["stacked"] else None,
                      [unit(u) for u in s["separate"]]) for s in doc["sites"]]
        return cls(model, sites, holdout=tensors.get("holdout"), fingerprint=doc["fingerprint"], meta=doc["meta"])


def _check_budget(budget: float) -> None:
    if not (isinstance(budget, (int, float)) and 0.0 < budget <= 1.0):
        raise ValueError(f"budget must be in (0, 1], got {budget!r}")


def _block_of(path: str) -> str:
    """The block a module belongs to: its path up to the last numeric component (``model.layers.3``)."""
    parts = path.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].isdigit():
            return ".".join(parts[: i + 1])
    return ""


# ---------------------------------------------------------------------------------------- building
def _output_weights(stats: CalibrationStats, site: SiteStats, linears, weighting: str,
                    factor: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Per member, the error weight of each output channel (see ProfileOptions.error_weighting)."""
    out = {}
    sample = site.sample
    for m in site.members:
        w = linears[m].weight.detach().float().cpu()
        if weighting == "fisher" and m in stats.grad_sq:
            out[m] = stats.grad_sq[m].float()
        else:
            energy = float((w.double() @ factor).square().sum()) if factor is not None else \
                float((sample @ w.t()).square().sum(1).mean())
            out[m] = torch.full((w.shape[0],), 1.0 / max(energy, 1e-30))
    return out


def _unit_candidates(name, members, linears, site: SiteStats, factor, out_w: dict[str, torch.Tensor],
                     with_neuron: bool, rank_min_aspect: float) -> UnitCandidates:
    weight = torch.cat([linears[m].weight.detach().float().cpu() for m in members])
    m, n = weight.shape
    g2 = torch.cat([out_w[x] for x in members])
    curves: dict[str, Curve] = {}
    basis = None
    if factor is not None and m >= rank_min_aspect * n:
        basis, _ = output_pca(weight, factor)
        z = site.sample @ (basis.t() @ weight).t()
        rank_weight = (basis.square() * g2[:, None]).sum(0)
        curves["rank"] = rank_curve(z, rank_weight, m, n)
    if with_neuron:
        curves["neuron"] = neuron_curve(site.sample, weight, g2)
    return UnitCandidates(name, tuple(members), tuple(linears[x].out_features for x in members), n, curves, basis)


def _data_free_site(members, linears) -> Site:
    """Static low-rank candidates from the weights' spectra alone (no calibration data)."""
    units = []
    for path in members:
        w = linears[path].weight.detach().float().cpu()
        m, n = w.shape
        basis, energy = weight_svd(w)
        rank_weight = torch.full((basis.shape[1],), 1.0 / float(energy.sum().clamp_min(1e-30)))
        curves = {"rank": static_rank_curve(energy, rank_weight, m, n)}
        units.append(UnitCandidates(path, (path,), (m,), n, curves, basis))
    return Site(tuple(members), None, units)


def _data_key(data: Any) -> str:
    h = hashlib.blake2b(digest_size=12)
    if isinstance(data, torch.Tensor):
        h.update(str(tuple(data.shape)).encode())
        h.update(data.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()
    return ""


def profile(model: torch.nn.Module, data: Any = None, *, options: ProfileOptions | None = None,
            loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor] | None = None,
            under: Plan | None = None, cache: bool | str | os.PathLike = True) -> Profile:
    """Calibrate ``model`` once: statistics, decompositions and candidate curves of every linear.

    Args:
        model: an HF causal LM or any ``nn.Module`` with ``nn.Linear`` layers (not modified).
        data: calibration token windows ``[N, L]`` (see ``ranapass.data``), an iterable of model
            inputs, or None for data-free profiling (static low rank from the weights' spectra).
        options: ``ProfileOptions``.
        loss_fn: ``loss_fn(model, batch) -> summed loss`` for Fisher weights on non-LM models.
        under: sequential calibration: collect every statistic while this plan runs eagerly, so each
            unit is calibrated on the inputs the *adapted* upstream layers give it (re-plan from the
            result at the same budget). Not cached.
        cache: True to reuse/store the profile under the ranapass cache (token-window data only),
            a directory to use instead, or False.

    Example::

        model, tok = ranapass.models.load_model()
        windows = ranapass.data.calibration_windows(tok)
        profile = ranapass.profile(model, windows)
        plan = profile.plan(budget=0.56)
    """
    options = options or ProfileOptions()
    model.eval()
    fingerprint = weights_fingerprint(model)
    linears = candidate_linears(model, options.exclude)
    key = None
    if cache and under is None and (data is None or isinstance(data, torch.Tensor)):
        key = hashlib.blake2b((fingerprint + _data_key(data) + json.dumps(dataclasses.asdict(options)) +
                               f"v{PROFILE_VERSION}").encode(), digest_size=12).hexdigest()
        folder = Path(cache) / key if not isinstance(cache, bool) else cache_dir("profiles", key)
        if (folder / "profile.json").is_file():
            log.info("loading cached profile %s", folder)
            return Profile.load(folder, model, check_fingerprint=False)

    t0 = time.perf_counter()
    if data is None:
        if under is not None:
            raise ValueError("sequential calibration (under=plan) needs calibration data")
        sites = _profile_data_free(model, linears)
        holdout, meta = None, {"data": "none (weights' spectra)"}
    elif under is not None:
        with temporarily_attached(model, under):
            sites, holdout, meta = _profile_with_data(model, data, linears, options, loss_fn)
        meta["calibrated_under"] = f"plan at budget {under.budget} ({under.allocation})"
    else:
        sites, holdout, meta = _profile_with_data(model, data, linears, options, loss_fn)
    meta.update({"model": type(model).__name__, "profile_seconds": round(time.perf_counter() - t0, 1),
                 "options": dataclasses.asdict(options)})
    result = Profile(model, sites, holdout=holdout, fingerprint=fingerprint, meta=meta)
    log.info("profiled %d units over %d sites in %.1fs", len(result.units), len(sites), meta["profile_seconds"])
    if key is not None:
        result.save(folder)
    return result


def _profile_data_free(model, linears) -> list[Site]:
    # Sites without data: every linear alone (sharing an input cannot be seen without running).
    return [_data_free_site([name], linears) for name in linears]


def _profile_with_data(model, data, linears, options: ProfileOptions, loss_fn):
    holdout = None
    if isinstance(data, torch.Tensor):
        if data.dim() != 2:
            raise ValueError(f"token windows must be [N, L], got shape {tuple(data.shape)}")
        if options.holdout_windows and data.shape[0] > options.holdout_windows:
            holdout = data[-options.holdout_windows:].clone()
            data = data[: -options.holdout_windows]
        grad_data = data[: options.gradient_windows] if options.error_weighting == "fisher" else None
    else:
        data = list(data)
        grad_data = data[: options.gradient_windows] if options.error_weighting == "fisher" else None
    if options.error_weighting == "fisher" and loss_fn is None and not hasattr(model, "config"):
        log.warning("no loss for Fisher weights on %s: using relative error weighting", type(model).__name__)
        grad_data = None
    stats = collect(model, data, linears=linears, batch_size=options.batch_size,
                    sample_tokens=options.sample_tokens, rank_min_aspect=options.rank_min_aspect,
                    gradient_data=grad_data, loss_fn=loss_fn, seed=options.seed)
    sites = []
    for s in tqdm(stats.sites, desc="candidate curves", unit="site"):
        factor = gram_factor(s.gram, s.tokens) if s.gram is not None else None
        out_w = _output_weights(stats, s, linears, options.error_weighting, factor)
        aspect = options.rank_min_aspect
        separate = [_unit_candidates(m, [m], linears, s, factor, out_w, True, aspect) for m in s.members]
        stacked = None
        if len(s.members) > 1 and factor is not None:
            stacked = _unit_candidates(_stack_name(s.members), s.members, linears, s, factor, out_w, False, aspect)
        sites.append(Site(tuple(s.members), stacked, separate))
    meta = {"data": f"{stats.windows} windows, {stats.tokens} tokens",
            "error_weighting": "fisher" if stats.grad_sq else "relative"}
    return sites, holdout, meta
