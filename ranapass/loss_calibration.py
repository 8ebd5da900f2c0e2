"""Loss calibration of the candidate curves: rescale each unit's proxy error so that it tracks the loss.

The allocator sums a proxy over units (output error weighted by squared output gradients,
``ranapass.candidates``). The proxy is blind to how a unit's output error reaches the loss (the
correlations between output channels, what the later layers undo), so its ratio to the loss a unit
costs differs between projections of a block and between blocks (benchmarks/RESULTS.md has the
measured spread on SmolLM2).

Measured once in ``profile``, on the held-out calibration windows: with every unit of one *block*
adapted at one probe point (its neuron candidate nearest ``PROBE_KEPT`` of its inputs kept), then
with every unit of one *role*, the mean KL divergence of the model's next-token distribution from
the dense model's. KL rather than a difference of NLLs: it is never negative and has no first-order
term, whose noise swamps a one-block change on a few windows. A unit's block is its module path up
to its first index (``model.layers.3``), its role the path with every index replaced by ``*``
(``model.layers.*.mlp.down_proj``). The model ``scale(unit) = s[block] * t[role]`` is fitted to the
probes' sums by iterative proportional fitting, and every curve of a unit (rank and neuron) is
multiplied by its scale; a stacked unit takes its members' scales averaged with their probe proxies
as weights. The calibrated errors are in nats of KL (additive estimates).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ranapass import distributed
from ranapass.adapters import ADAPTER_KINDS
from ranapass.attach import temporarily_attached
from ranapass.candidates import Site, UnitCandidates
from ranapass.evaluate import model_logits
from ranapass.linear_match import linear_module
from ranapass.offload import onloaded
from ranapass.plan import Plan, UnitPlan

__all__ = ["PROBE_KEPT", "block_of", "role_of", "loss_scales", "rescaled"]

PROBE_KEPT = 0.5
"""Kept fraction of a unit's inputs at its probe point."""

_FIT_ROUNDS = 100


def block_of(name: str) -> str:
    """A unit's block: its path up to its first numeric component (the whole path when it has none)."""
    match = re.match(r"^(.*?\.\d+)(\.|$)", name)
    return match.group(1) if match else name


def role_of(name: str) -> str:
    """A unit's role: its path with every numeric component replaced by ``*``."""
    return re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", name)


def _probe_index(unit: UnitCandidates) -> int:
    curve = unit.curves["neuron"]
    return int(np.argmin(np.abs(curve.kept / curve.rank - PROBE_KEPT)))


def _probe_plan(model: torch.nn.Module, probed: list[UnitCandidates]) -> Plan:
    """Each of ``probed`` as a neuron adapter at its probe point; every other linear stays as it is."""
    units = []
    for unit in probed:
        modules = [model.get_submodule(m) for m in unit.members]
        with onloaded(modules):
            weight = torch.cat([linear_module(m).weight.detach().float() for m in modules])
        adapter = ADAPTER_KINDS["neuron"].from_candidate(unit, _probe_index(unit), weight)
        units.append(UnitPlan(unit.name, unit.members, unit.out_features, unit.in_features, adapter,
                              float(unit.curves["neuron"].kept[_probe_index(unit)])))
    return Plan(units, 1.0, "loss-calibration probe", "", {})


@torch.no_grad()
def _log_probs(model: torch.nn.Module, windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    return [F.log_softmax(model_logits(model(b.to(device))).float(), -1) for b in windows.split(batch_size)]


@torch.no_grad()
def _mean_kl(model: torch.nn.Module, windows: torch.Tensor, dense: list[torch.Tensor], batch_size: int) -> float:
    """Mean KL(dense || model) per position over ``windows``."""
    total, count = 0.0, 0
    for ref, lp in zip(dense, _log_probs(model, windows, batch_size), strict=True):
        total += float((ref.exp() * (ref - lp)).sum(-1).double().sum())
        count += ref.shape[0] * ref.shape[1]
    return total / count


def loss_scales(model: torch.nn.Module, sites: list[Site], holdout: torch.Tensor,
                batch_size: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Per unit with a neuron curve (member units), its loss scale; and the facts of the probes.

    Processes of a group share the probes and all get the same scales.
    """
    units = [u for s in sites for u in s.separate if "neuron" in u.curves]
    groups: dict[frozenset[str], list[UnitCandidates]] = {}
    for key in (block_of, role_of):
        for label in dict.fromkeys(key(u.name) for u in units):
            members = [u for u in units if key(u.name) == label]
            groups.setdefault(frozenset(u.name for u in members), members)
    probes = list(groups.values())
    dense = _log_probs(model, holdout, batch_size)
    measured = []
    for i, probed in distributed.shard(probes):
        with temporarily_attached(model, _probe_plan(model, probed)):
            measured.append((i, _mean_kl(model, holdout, dense, batch_size)))
    kl = np.array(distributed.gather_ordered(measured, "loss-calibration probes"))
    proxy = np.array([float(u.curves["neuron"].error[_probe_index(u)]) for u in units])
    scales = _fit(units, probes, kl, proxy)
    facts = {"probes": len(probes), "probe_kept": PROBE_KEPT, "windows": int(holdout.shape[0]),
             "scale_range": [float(scales.min()), float(scales.max())] if len(scales) else []}
    return {u.name: float(s) for u, s in zip(units, scales)}, facts


def _fit(units: list[UnitCandidates], probes: list[list[UnitCandidates]], kl: np.ndarray,
         proxy: np.ndarray) -> np.ndarray:
    """Per unit ``s[block] * t[role]``, fitted so that each probe's scaled proxy sums to its measured KL.

    Iterative proportional fitting on the block x role table of probe proxies. Block probes fix the
    row sums; the role probes' KLs are rescaled to the same total (the two sets measure the same
    units; requiring both totals exactly would leave no solution).
    """
    found = {frozenset(u.name for u in p): k for k, p in enumerate(probes)}

    def targets(key) -> tuple[np.ndarray, np.ndarray]:
        labels = list(dict.fromkeys(key(u.name) for u in units))
        of = np.array([labels.index(key(u.name)) for u in units])
        sums = np.array([kl[found[frozenset(u.name for u in units if key(u.name) == lab)]] for lab in labels])
        return of, np.maximum(sums, 1e-12)

    block, block_kl = targets(block_of)
    role, role_kl = targets(role_of)
    role_kl = role_kl * block_kl.sum() / role_kl.sum()
    proxy = np.maximum(proxy, 1e-30)
    s, t = np.ones(len(block_kl)), np.ones(len(role_kl))
    for _ in range(_FIT_ROUNDS):
        s = block_kl / np.bincount(block, t[role] * proxy, minlength=len(s))
        t = role_kl / np.bincount(role, s[block] * proxy, minlength=len(t))
    return s[block] * t[role]


def rescaled(sites: list[Site], scales: dict[str, float]) -> list[Site]:
    """The sites with every curve's error multiplied by its unit's scale (units without one unchanged)."""
    def unit(u: UnitCandidates, scale: float) -> UnitCandidates:
        return dataclasses.replace(u, curves={k: dataclasses.replace(c, error=c.error * scale)
                                              for k, c in u.curves.items()})

    out = []
    for site in sites:
        separate = [unit(u, scales[u.name]) if u.name in scales else u for u in site.separate]
        stacked = site.stacked
        if stacked is not None and all(m in scales for m in stacked.members):
            weights = {u.name: float(u.curves["neuron"].error[_probe_index(u)]) for u in site.separate}
            total = sum(weights[m] for m in stacked.members)
            scale = (sum(scales[m] * weights[m] for m in stacked.members) / total if total > 0
                     else float(np.mean([scales[m] for m in stacked.members])))
            stacked = unit(stacked, scale)
        out.append(Site(site.members, stacked, separate))
    return out
