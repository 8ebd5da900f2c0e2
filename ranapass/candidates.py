"""Candidates: for every unit a model could adapt, its candidate configurations with cost and error.

Units: linears that read one input tensor form a *site*. A multi-member site (q/k/v, gate/up) can be
adapted as one stacked rank adapter (one B and one mask) or member by member; the allocator picks
whichever is better for each site. Every unit may also stay dense or become a neuron adapter.

The candidates of a unit come from its calibration statistics (``ranapass.calibrate``): the rank
adapter's basis (``ranapass.decompose``), then the candidate curves (cost_model/curves.py) on the
sampled inputs, with errors weighted per output channel (``_output_weights``). Without data, every
linear is its own site with static low-rank candidates from its weights' spectrum. Weights are read in
(out, in) layout whatever their storage (``LinearModule.weight``: Conv1D stores (in, out)).

The linear algebra runs where the statistics are (the layer's device), one site at a time: a site's
Gram matrix and sample are released as soon as its candidates are built, and what a unit keeps (its
curves, its basis as float32) moves to the host, so device memory does not grow with the model.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ranapass.calibrate import CalibrationStats, SiteStats
from ranapass.cost_model import flops
from ranapass.cost_model.allocate import Candidate, Candidates
from ranapass.cost_model.curves import Curve, neuron_curve, rank_curve, static_rank_curve
from ranapass.decompose import gram_factor, output_pca, weight_svd
from ranapass.linear_match import LinearModule
from ranapass.offload import onloaded
from ranapass.timing import Stopwatch

__all__ = ["KINDS", "UnitCandidates", "UnitOptions", "Site", "stack_name", "calibrated_sites", "data_free_sites"]

KINDS = ("rank", "lowrank", "neuron")
"""Candidate families: rank adapters (masked or not), static low rank only (no mask), neuron adapters."""


@dataclasses.dataclass
class UnitOptions:
    """A unit's allowed candidates: ``keys[i]`` is ``(curve kind, index)`` (``("dense", -1)`` for dense), with
    its cost (FLOPs per token, masks included unless left out), error and first-order loss change."""

    keys: list[tuple[str, int]]
    cost: np.ndarray
    error: np.ndarray
    first_order: np.ndarray

    def candidates(self) -> Candidates:
        """Costs and errors as the allocator takes them."""
        return Candidates(self.cost, self.error)


@dataclasses.dataclass
class UnitCandidates:
    """One unit (a single linear, or a stack of linears sharing an input) and its candidate curves."""

    name: str
    members: tuple[str, ...]
    out_features: tuple[int, ...]
    in_features: int
    curves: dict[str, Curve]
    basis: torch.Tensor | None = None  # [m, r] output principal axes, float32 on the CPU, for rank adapters

    @property
    def dense_flops(self) -> float:
        return flops.per_token(flops.dense_linear(sum(self.out_features), self.in_features))

    def options(self, kinds: Sequence[str], dense: bool = True, count_mask_cost: bool = True) -> UnitOptions:
        """The allowed candidates ("dense" first when allowed) with their costs, errors and first-order terms.

        "rank" allows every rank-adapter candidate (masked or not), "lowrank" only the unmasked ones.
        ``count_mask_cost=False`` leaves the masks' FLOPs out of the costs (an ablation).
        """
        keys = [("dense", -1)] if dense else []
        parts = [(np.array([self.dense_flops]), np.zeros(1), np.zeros(1))] if dense else []
        for kind in ("rank", "neuron"):
            curve = self.curves.get(kind)
            wanted = [k for k in kinds if (k == "lowrank" and kind == "rank") or k == kind]
            if curve is None or not wanted:
                continue
            idx = np.arange(len(curve)) if kind in wanted else np.flatnonzero(curve.tau == 0)
            cost = curve.flops[idx] - (0.0 if count_mask_cost else flops.MASK_FLOPS_PER_SCORE * curve.rank[idx])
            keys += [(kind, i) for i in idx.tolist()]
            parts.append((cost, curve.error[idx], curve.first_order[idx]))
        if not parts:
            return UnitOptions([], np.zeros(0), np.zeros(0), np.zeros(0))
        return UnitOptions(keys, *(np.concatenate(arrays).astype(np.float64) for arrays in zip(*parts)))

    def candidate(self, option: tuple[str, int]) -> Candidate:
        """Cost (FLOPs per token, masks included) and error of one option."""
        kind, i = option
        if kind == "dense":
            return Candidate(self.dense_flops, 0.0)
        c = self.curves[kind]
        return Candidate(float(c.flops[i]), float(c.error[i]))

    def saved(self, uid: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The JSON entry of this unit; its arrays go into ``tensors`` under ``<uid>.``."""
        for kind, curve in self.curves.items():
            for field, arr in curve.arrays().items():
                tensors[f"{uid}.{kind}.{field}"] = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float64))
        if self.basis is not None:
            tensors[f"{uid}.basis"] = self.basis.contiguous()
        return {"name": self.name, "members": list(self.members), "out_features": list(self.out_features),
                "in_features": self.in_features, "curves": sorted(self.curves), "uid": uid}

    @classmethod
    def from_saved(cls, entry: dict[str, Any], tensors: dict[str, torch.Tensor]) -> UnitCandidates:
        """The unit ``saved`` wrote."""
        uid = entry["uid"]
        curves = {k: Curve(k, *(tensors[f"{uid}.{k}.{f}"].numpy() for f in Curve.FIELDS)) for k in entry["curves"]}
        return cls(entry["name"], tuple(entry["members"]), tuple(entry["out_features"]), entry["in_features"],
                   curves, tensors.get(f"{uid}.basis"))


@dataclasses.dataclass
class Site:
    """Linears reading one input: the stacked unit (if several members) and the per-member units."""

    members: tuple[str, ...]
    stacked: UnitCandidates | None
    separate: list[UnitCandidates]

    def alternatives(self, grouping: bool) -> list[list[UnitCandidates]]:
        """The ways to adapt the site: the stacked unit alone (when ``grouping``) or every member apart."""
        alts = [self.separate]
        if grouping and self.stacked is not None:
            alts.insert(0, [self.stacked])
        return alts

    def saved(self, index: int, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The JSON entry of site number ``index``; its arrays go into ``tensors``."""
        return {"members": list(self.members),
                "stacked": self.stacked.saved(f"{index}.s", tensors) if self.stacked is not None else None,
                "separate": [u.saved(f"{index}.{j}", tensors) for j, u in enumerate(self.separate)]}

    @classmethod
    def from_saved(cls, entry: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Site:
        """The site ``saved`` wrote."""
        stacked = UnitCandidates.from_saved(entry["stacked"], tensors) if entry["stacked"] else None
        return cls(tuple(entry["members"]), stacked, [UnitCandidates.from_saved(u, tensors) for u in entry["separate"]])


def stack_name(members: Sequence[str]) -> str:
    """The name of a stacked unit: ``model.layers.0.self_attn.{q_proj,k_proj,v_proj}``."""
    prefix = os.path.commonprefix([m.rsplit(".", 1)[0] + "." for m in members])
    if not prefix.endswith("."):
        prefix = prefix[: prefix.rfind(".") + 1]
    return prefix + "{" + ",".join(m[len(prefix):] for m in members) + "}"


def _output_weights(stats: CalibrationStats, site: SiteStats, sample: torch.Tensor,
                    linears: dict[str, LinearModule], weighting: str,
                    factor: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Per member, the error weight of each output channel (see ProfileOptions.error_weighting)."""
    out = {}
    for m in site.members:
        w = linears[m].weight.detach().float()
        if weighting == "fisher" and m in stats.grad_sq:
            out[m] = stats.grad_sq[m].float().to(w.device)
        else:
            energy = float((w.double() @ factor).square().sum()) if factor is not None else \
                float((sample @ w.t()).square().sum(1).mean())
            out[m] = torch.full((w.shape[0],), 1.0 / max(energy, 1e-30), device=w.device)
    return out


def _unit_candidates(name, members, linears, sample: torch.Tensor, factor, out_w: dict[str, torch.Tensor],
                     with_neuron: bool, rank_min_aspect: float, stopwatch: Stopwatch,
                     first_order: torch.Tensor | None = None) -> UnitCandidates:
    weight = torch.cat([linears[m].weight.detach().float() for m in members])
    m, n = weight.shape
    g2 = torch.cat([out_w[x] for x in members])
    curves: dict[str, Curve] = {}
    basis = None
    if factor is not None and m >= rank_min_aspect * n:
        with stopwatch.stage("output_pca"):
            basis, _ = output_pca(weight, factor.to(weight.device))
        with stopwatch.stage("rank_curves"):
            z = sample @ (basis.t() @ weight).t()
            rank_weight = (basis.square() * g2[:, None]).sum(0)
            curves["rank"] = rank_curve(z, rank_weight, m, n)
        basis = basis.cpu()
    if with_neuron:
        with stopwatch.stage("neuron_curves"):
            curves["neuron"] = neuron_curve(sample, weight, g2,
                                            first_order=None if first_order is None else first_order.numpy())
    return UnitCandidates(name, tuple(members), tuple(linears[x].out_features for x in members), n, curves, basis)


def shrunk_first_order(stats: CalibrationStats, member: str) -> torch.Tensor | None:
    """``member``'s first-order terms shrunk toward zero by their standard errors (positive-part James-Stein:
    ``f * max(0, 1 - se^2 / f^2)``), or None when not measured.

    The allocator seeks out the candidates whose term looks best, so an unshrunk term measured on a few
    windows steers it to noise: across five draws of calibration text the unshrunk terms gave one 0.7 plan in
    five at +2.5% over dense (benchmarks/RESULTS.md, quality across calibration draws). A term within about one
    standard error of zero mostly goes, a clear one stays nearly whole; without an error estimate (fewer
    than 2 windows) the term is kept as measured.
    """
    mean = stats.first_order.get(member)
    if mean is None:
        return None
    se = stats.first_order_se.get(member)
    if se is None or torch.isnan(se).any():
        return mean
    return mean * (1.0 - se.square() / mean.square().clamp_min(1e-300)).clamp(0.0, 1.0)


def calibrated_sites(stats: CalibrationStats, linears: dict[str, LinearModule], error_weighting: str,
                     rank_min_aspect: float, stopwatch: Stopwatch | None = None) -> list[Site]:
    """Every site of ``stats`` with its candidates: per member, and stacked where a site has several.

    Consumes the statistics: each site's Gram matrix and sample are released once its candidates are
    built. ``stopwatch`` records the seconds of each step (gram_factor, output_pca, rank_curves,
    neuron_curves).
    """
    stopwatch = stopwatch or Stopwatch()
    sites = []
    for s in tqdm(stats.sites, desc="candidate curves", unit="site"):
        sample = s.sample
        factor = None
        if s.gram is not None:
            with stopwatch.stage("gram_factor"):
                factor = gram_factor(s.gram, s.tokens)
        with onloaded(linears[m].module for m in s.members):  # offloaded weights, one site at a time
            out_w = _output_weights(stats, s, sample, linears, error_weighting, factor)
            unit = functools.partial(_unit_candidates, linears=linears, sample=sample, factor=factor, out_w=out_w,
                                     rank_min_aspect=rank_min_aspect, stopwatch=stopwatch)
            separate = [unit(m, [m], with_neuron=True, first_order=shrunk_first_order(stats, m)) for m in s.members]
            stacked = None
            if len(s.members) > 1 and factor is not None:
                stacked = unit(stack_name(s.members), s.members, with_neuron=False)
        sites.append(Site(tuple(s.members), stacked, separate))
        s.release()
    return sites


def data_free_sites(linears: dict[str, LinearModule]) -> list[Site]:
    """Static low-rank candidates from the weights' spectra alone (no calibration data).

    Every linear is a site of its own: sharing an input cannot be seen without running the model.
    """
    sites = []
    for path, linear in linears.items():
        w = linear.weight.detach().float()
        m, n = w.shape
        basis, energy = weight_svd(w)
        rank_weight = torch.full((basis.shape[1],), 1.0 / float(energy.sum().clamp_min(1e-30)), device=w.device)
        curves = {"rank": static_rank_curve(energy, rank_weight, m, n)}
        sites.append(Site((path,), None, [UnitCandidates(path, (path,), (m,), n, curves, basis.cpu())]))
    return sites
