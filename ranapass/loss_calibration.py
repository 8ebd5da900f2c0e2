"""Loss calibration of the candidate curves: rescale each unit's proxy error so that it tracks the loss.

The allocator sums a proxy over units (output error weighted by squared output gradients,
``ranapass.candidates``). The proxy is blind to how a unit's output error reaches the loss (the
correlations between output channels, what the later layers undo), so its ratio to the loss a unit
costs differs between projections of a block and between blocks (benchmarks/RESULTS.md has the
measured spread on SmolLM2).

Measured once in ``profile``, on the held-out calibration windows: with every unit of one *block*
adapted at one probe point (its neuron candidate nearest a kept fraction of its inputs, one of
``probe_kept``), then with every unit of one *role*, the mean KL divergence of the model's next-token
distribution from the dense model's. KL rather than a difference of NLLs: it is never negative and has
no first-order term, whose noise swamps a one-block change on a few windows (the first-order term is
measured per candidate by calibration's gradient pass instead, ``ranapass.calibrate``). A unit's block is its
module path up to its first index (``model.layers.3``), its role the path with every index replaced by
``*`` (``model.layers.*.mlp.down_proj``). At each probe level the model ``scale(unit) = s[block] * t[role]``
is fitted to the probes' sums by iterative proportional fitting.

How much KL a unit of proxy costs depends on how hard the unit is cut, not only on where it sits (a
unit's loss does not grow in proportion to its output error; see docs/quality.md), so with several
probe levels a candidate's scale is interpolated between them, in log scale, by its FLOP fraction
(adapted / dense FLOPs of the unit, the common axis of rank and neuron candidates), and held constant
beyond the outermost probes. A stacked unit takes its members' scales averaged with their probe
proxies as weights, level by level. The calibrated errors are in nats of KL (additive estimates).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ranapass import distributed
from ranapass.adapters import ADAPTER_KINDS
from ranapass.attach import temporarily_attached
from ranapass.block_replay import BlockReplay
from ranapass.candidates import Site, UnitCandidates
from ranapass.evaluate import model_logits
from ranapass.linear_match import linear_module
from ranapass.offload import onloaded
from ranapass.plan import Plan, UnitPlan

__all__ = ["PROBE_KEPT", "LossScale", "block_of", "role_of", "probe_groups", "probe_plan", "loss_scales", "rescaled"]

PROBE_KEPT = (0.5,)
"""Default kept fractions of a unit's inputs at its probe points, one set of probes per level (a second
level at 85% made SmolLM2 worse at 0.8: docs/quality.md)."""

_FIT_ROUNDS = 100


@dataclasses.dataclass(frozen=True)
class LossScale:
    """A unit's loss scale at each probe level: ``scale[i]`` at FLOP fraction ``at[i]`` (rising)."""

    at: np.ndarray
    scale: np.ndarray

    def __call__(self, fraction: np.ndarray) -> np.ndarray:
        """The scale at each FLOP fraction: log-linear between the probes, constant beyond them."""
        return np.exp(np.interp(fraction, self.at, np.log(self.scale)))


def block_of(name: str) -> str:
    """A unit's block: its path up to its first numeric component (the whole path when it has none)."""
    match = re.match(r"^(.*?\.\d+)(\.|$)", name)
    return match.group(1) if match else name


def role_of(name: str) -> str:
    """A unit's role: its path with every numeric component replaced by ``*``."""
    return re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", name)


def probe_groups(units: list[UnitCandidates]) -> dict[str, list[UnitCandidates]]:
    """The probes' unit groups by label: every block's units, then every role's (a group met twice, once)."""
    groups: dict[str, list[UnitCandidates]] = {}
    seen: set[frozenset[str]] = set()
    for key in (block_of, role_of):
        for label in dict.fromkeys(key(u.name) for u in units):
            members = [u for u in units if key(u.name) == label]
            if frozenset(u.name for u in members) not in seen:
                seen.add(frozenset(u.name for u in members))
                groups[label] = members
    return groups


def _probe_index(unit: UnitCandidates, kept: float) -> int:
    curve = unit.curves["neuron"]
    return int(np.argmin(np.abs(curve.kept / curve.rank - kept)))


def probe_plan(model: torch.nn.Module, probed: list[UnitCandidates], kept: float) -> Plan:
    """Each of ``probed`` as a neuron adapter at its probe point for ``kept``; every other linear stays as it is."""
    units = []
    for unit in probed:
        modules = [model.get_submodule(m) for m in unit.members]
        with onloaded(modules):
            weight = torch.cat([linear_module(m).weight.detach().float() for m in modules])
        i = _probe_index(unit, kept)
        adapter = ADAPTER_KINDS["neuron"].from_candidate(unit, i, weight)
        units.append(UnitPlan(unit.name, unit.members, unit.out_features, unit.in_features, adapter,
                              float(unit.curves["neuron"].kept[i])))
    return Plan(units, 1.0, "loss-calibration probe", "", {})


def _forward_kwargs(model: torch.nn.Module) -> dict[str, Any]:
    """``use_cache=False`` where the forward takes it: a probe needs no KV cache, and block replay needs a
    forward whose blocks only pass hidden states on."""
    return {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}


@torch.no_grad()
def _log_probs(model: torch.nn.Module, batch: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    return F.log_softmax(model_logits(model(batch, **kwargs)).float(), -1)


@torch.no_grad()
def _mean_kl(model: torch.nn.Module, batches: list[torch.Tensor], dense: list[torch.Tensor], kwargs: dict[str, Any],
             replay: BlockReplay, skip: list[str]) -> float:
    """Mean KL(dense || model) per position over ``batches``, replaying the blocks ``skip``."""
    total, count = 0.0, 0
    for i, (batch, ref) in enumerate(zip(batches, dense, strict=True)):
        with replay.replaying(i, skip):
            lp = _log_probs(model, batch, kwargs)
        total += float((ref.exp() * (ref - lp)).sum(-1).double().sum())
        count += ref.shape[0] * ref.shape[1]
    return total / count


def loss_scales(model: torch.nn.Module, sites: list[Site], holdout: torch.Tensor, batch_size: int,
                probe_kept: tuple[float, ...] = PROBE_KEPT, *,
                replay: bool = True) -> tuple[dict[str, LossScale], dict[str, Any]]:
    """Per unit with a neuron curve (member units), its loss scales at the ``probe_kept`` levels; and the
    facts of the probes.

    Processes of a group share the probes and all get the same scales. With ``replay`` a probe does not
    rerun the blocks that return before its first adapted linear runs: they return their dense outputs
    (``ranapass.block_replay``; the same scales, less work; a model whose forward takes no ``use_cache``
    is run whole).
    """
    units = [u for s in sites for u in s.separate if "neuron" in u.curves]
    probes = list(probe_groups(units).values())
    levels = sorted(set(probe_kept))
    device = next(model.parameters()).device
    batches = [b.to(device) for b in holdout.split(batch_size)]
    kwargs = _forward_kwargs(model)
    blocks = [block_of(u.name) for u in units] if replay and kwargs else []
    recorded = BlockReplay(model, blocks, [u.name for u in units])
    dense = []
    for i, batch in enumerate(batches):
        with recorded.recording(i):
            dense.append(_log_probs(model, batch, kwargs))
    tasks = [(kept, probed, recorded.before(u.name for u in probed)) for kept in levels for probed in probes]
    measured = []
    for i, (kept, probed, skip) in distributed.shard(tasks):
        with temporarily_attached(model, probe_plan(model, probed, kept)):
            measured.append((i, _mean_kl(model, batches, dense, kwargs, recorded, skip)))
    kl = np.array(distributed.gather_ordered(measured, "loss-calibration probes")).reshape(len(levels), len(probes))
    per_level, at = [], []
    for k, kept in enumerate(levels):
        idx = [_probe_index(u, kept) for u in units]
        proxy = np.array([float(u.curves["neuron"].error[i]) for u, i in zip(units, idx)])
        per_level.append(_fit(units, probes, kl[k], proxy))
        at.append([float(u.curves["neuron"].flops[i]) / u.dense_flops for u, i in zip(units, idx)])
    scales, fractions = np.array(per_level), np.array(at)
    out = {u.name: _scale(fractions[:, j], scales[:, j]) for j, u in enumerate(units)}
    facts = {"probes": len(tasks), "probe_kept": levels, "windows": int(holdout.shape[0]),
             "replayed_blocks": sum(len(skip) for _, _, skip in tasks),
             "scale_range": [[float(s.min()), float(s.max())] for s in scales] if len(units) else []}
    return out, facts


def _scale(at: np.ndarray, scale: np.ndarray) -> LossScale:
    """A unit's ``LossScale`` from its probes' FLOP fractions and scales (levels sorted by fraction)."""
    order = np.argsort(at, kind="stable")
    return LossScale(at[order], scale[order])


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


def _stacked_scale(site: Site, scales: dict[str, LossScale]) -> LossScale:
    """A stacked unit's scale: its members', level by level, averaged with their probe proxies as weights."""
    members = [u for u in site.separate if u.name in site.stacked.members]
    at, scale = [], []
    for k in range(len(scales[members[0].name].scale)):
        weights = []
        for u in members:
            curve, frac = u.curves["neuron"], scales[u.name].at[k]
            i = int(np.argmin(np.abs(curve.flops / u.dense_flops - frac)))
            weights.append(float(curve.error[i]))
        values = [scales[u.name].scale[k] for u in members]
        total = sum(weights)
        scale.append(sum(v * w for v, w in zip(values, weights)) / total if total > 0 else float(np.mean(values)))
        at.append(float(np.mean([scales[u.name].at[k] for u in members])))
    return _scale(np.array(at), np.array(scale))


def rescaled(sites: list[Site], scales: dict[str, LossScale]) -> list[Site]:
    """The sites with every candidate's error multiplied by its unit's scale at the candidate's FLOP fraction
    (units without one unchanged)."""
    def unit(u: UnitCandidates, scale: LossScale) -> UnitCandidates:
        return dataclasses.replace(u, curves={k: dataclasses.replace(c, error=c.error * scale(c.flops / u.dense_flops))
                                              for k, c in u.curves.items()})

    out = []
    for site in sites:
        separate = [unit(u, scales[u.name]) if u.name in scales else u for u in site.separate]
        stacked = site.stacked
        if stacked is not None and all(m in scales for m in stacked.members):
            stacked = unit(stacked, _stacked_scale(site, scales))
        out.append(Site(site.members, stacked, separate))
    return out
