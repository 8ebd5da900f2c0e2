"""Activation-sparsity baselines built from ranapass's own adapters: TEAL-style and CATS-style.

Both are measured exactly like ranapass plans (same ``attach``, same eager path, same ``FlopMeter``),
so a comparison at equal *measured* FLOPs is a comparison of methods, not of accounting.

- **TEAL-style** (Liu et al., 2024): every linear input site (q/k/v together, o, gate/up together,
  down) becomes one neuron adapter keeping ``|x_j| >= t``. TEAL scores the input magnitude alone (no
  ``||W_j||`` factor), so all thresholds of a site are one scalar ``t``: the quantile of the dense
  model's ``|x|`` on calibration text at a sparsity ``s`` that is the same for every site.
- **CATS-style** (Lee et al., 2024), MLP only: the gate projection is computed densely; the
  intermediate units with ``|act(gate x)| < t`` (one cutoff per layer, a quantile at sparsity ``s``)
  skip their row of ``up`` and their column of ``down``. The gate/up pair is one ``GatedMaskAdapterSpec``
  (a kind of its own, ``ranapass.adapters.gated_mask``, without a kernel: compiled, its reference math is
  traced into the graph); ``down`` is a neuron adapter that keeps exactly its non-zero inputs,
  which are the units the gate kept. Per token and layer it costs ``2 n d`` (gate) ``+ 2 n k`` (up rows)
  ``+ 2 d`` (the mask) ``+ 2 m k`` (down columns) ``+ 2 d`` (down's zero test, which a fused kernel
  would not need: 0.1% of the MLP), with k of the d units kept; dense is ``6 n d`` (m = n = hidden).

For both, ``plan(budget)`` finds ``s`` by a secant search so that the FLOP ratio *measured* on
held-out calibration windows hits the budget (the thresholds come from dense-model activations,
as TEAL and CATS do, so the adapted model's own sparsity drifts from ``s``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ranapass.adapters import AdapterSpec, GatedMaskAdapterSpec, NeuronAdapterSpec
from ranapass.adapters.gated_mask import gate_magnitudes
from ranapass.attach import FlopMeter, temporarily_attached
from ranapass.calibrate import candidate_linears, collect, run_model
from ranapass.candidates import stack_name
from ranapass.cost_model.curves import sorted_values
from ranapass.data import split_holdout
from ranapass.fingerprint import weights_fingerprint
from ranapass.hooks import forward_hooks
from ranapass.kernels.activations import ACTIVATIONS
from ranapass.linear_match import LinearModule
from ranapass.plan import Plan, UnitPlan
from ranapass.plan_check import check_plan_fits

__all__ = [
    "GatedMaskAdapterSpec",
    "GatedMLP",
    "SparsityBaseline",
    "cats",
    "find_gated_mlps",
    "measured_ratio",
    "teal",
]

log = logging.getLogger(__name__)

QUANTILE_POINTS = 4097
"""Order statistics kept per site: thresholds at any sparsity are interpolated between them."""


# ---------------------------------------------------------------------------------------- structure
@dataclasses.dataclass(frozen=True)
class GatedMLP:
    """A gated MLP found in a model: ``down(act(gate(x)) * up(x))``."""

    gate: str
    up: str
    down: str
    activation: str


@torch.no_grad()
def find_gated_mlps(model: torch.nn.Module, batch: Any, linears: dict[str, LinearModule] | None = None,
                    ) -> list[GatedMLP]:
    """Find gated MLPs by what the linears compute on one batch (moved to the model's device), not by their names.

    Two linears that read the same input with equal widths, followed (next in call order among the
    linears of that width) by a linear whose input equals ``act(a) * b`` for a known activation, are
    (gate, up) and down.
    """
    linears = linears if linears is not None else candidate_linears(model)
    calls: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def hook(name):
        def fwd(module, args, out):
            calls.append((name, args[0], out))  # the input object itself: identity marks shared inputs
        return fwd

    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()} if isinstance(batch, dict) else batch.to(device)
    with forward_hooks([(lm.module, hook(n)) for n, lm in linears.items()]):
        run_model(model, batch)
    found, used = [], set()
    for i, (a, xa, ya) in enumerate(calls):
        for j in range(i + 1, len(calls)):
            b, xb, yb = calls[j]
            if xb is not xa or a in used or b in used or yb.shape != ya.shape:
                continue
            # the next linear reading a tensor of this width is the candidate down projection
            nxt = next((c for c in calls[j + 1:] if c[1].shape == ya.shape), None)
            if nxt is None:
                continue
            match = _match_gated(ya, yb, nxt[1])
            if match is not None:
                gate_first, act = match
                gate, up = (a, b) if gate_first else (b, a)
                found.append(GatedMLP(gate, up, nxt[0], act))
                used.update((a, b, nxt[0]))
    return found


def _match_gated(ya: torch.Tensor, yb: torch.Tensor, h: torch.Tensor) -> tuple[bool, str] | None:
    scale = float(h.abs().max()) + 1e-12
    for act, entry in ACTIVATIONS.items():
        for gate_first, (g, u) in ((True, (ya, yb)), (False, (yb, ya))):
            if float((entry.fn(g.float()) * u.float() - h.float()).abs().max()) <= 1e-4 * scale:
                return gate_first, act
    return None


# ---------------------------------------------------------------------------------------- thresholds
@dataclasses.dataclass
class _Quantiles:
    """Order statistics of one site's scores on calibration text: ``values[i]`` at fraction ``i / (P - 1)``."""

    values: np.ndarray

    @classmethod
    def of(cls, scores: torch.Tensor) -> _Quantiles:
        flat = sorted_values(scores.float())
        idx = torch.linspace(0, flat.numel() - 1, QUANTILE_POINTS).round().long()
        return cls(flat[idx.to(flat.device)].double().cpu().numpy())

    def threshold(self, sparsity: float) -> float:
        """Cutoff dropping a fraction ``sparsity`` of the calibration scores (0 keeps everything)."""
        if sparsity <= 0.0:
            return 0.0
        if sparsity >= 1.0:
            return math.inf
        return float(np.interp(sparsity, np.linspace(0.0, 1.0, len(self.values)), self.values))


@dataclasses.dataclass
class _SparseUnit:
    """One unit of a sparsity baseline: how to make its adapter for a cutoff, and the cutoff's quantiles."""

    name: str
    members: tuple[str, ...]
    out_features: tuple[int, ...]
    in_features: int
    quantiles: _Quantiles | None       # None: follows another unit's mask (CATS down projection)
    make: Callable[[float], AdapterSpec]
    width: int


def measured_ratio(model: torch.nn.Module, plan: Plan, windows: torch.Tensor, batch_size: int = 4) -> float:
    """FLOP ratio (block linears, adapted / dense) measured with real masks while ``plan`` runs eagerly."""
    check_plan_fits(model, plan)
    with temporarily_attached(model, plan), FlopMeter() as meter, torch.no_grad():
        for batch in windows.split(batch_size):
            run_model(model, batch.to(next(model.parameters()).device))
    return meter.ratio(plan)


class SparsityBaseline:
    """An activation-sparsity method calibrated on one model: ``plan(budget)`` or ``plan_at(sparsity)``.

    Build one with :func:`teal` or :func:`cats`.
    """

    def __init__(self, model: torch.nn.Module, method: str, units: list[_SparseUnit], dense: list[UnitPlan],
                 holdout: torch.Tensor | None, meta: dict[str, Any]):
        self.model = model
        self.method = method
        self.units = units
        self.dense = dense
        self.holdout = holdout
        self.fingerprint = weights_fingerprint(model)
        self.meta = meta

    def plan_at(self, sparsity: float) -> Plan:
        """The plan at one uniform sparsity (fraction of calibration scores below each cutoff)."""
        if not 0.0 <= sparsity <= 1.0:
            raise ValueError(f"sparsity must be in [0, 1], got {sparsity!r}")
        units = list(self.dense)
        for u in self.units:
            tau = u.quantiles.threshold(sparsity) if u.quantiles is not None else 0.0
            units.append(UnitPlan(u.name, u.members, u.out_features, u.in_features, u.make(tau),
                                  (1.0 - sparsity) * u.width))
        order = {m: i for i, m in enumerate(self.meta["linear_order"])}
        units.sort(key=lambda u: order[u.members[0]])
        meta = {k: v for k, v in self.meta.items() if k != "linear_order"}
        return Plan(units, 1.0, self.method, self.fingerprint, {**meta, "sparsity": sparsity})

    def expected_ratio(self, sparsity: float) -> float:
        """FLOP ratio on calibration text at ``sparsity`` (exact there, before the masks shift the inputs)."""
        return self.plan_at(sparsity).expected_ratio()

    def plan(self, budget: float, *, windows: torch.Tensor | None = None, tolerance: float = 0.003,
             max_steps: int = 6) -> Plan:
        """The plan whose FLOP ratio measured on ``windows`` (default: the held-out calibration windows) is
        ``budget`` within ``tolerance``, found by a safeguarded secant search on the sparsity.

        Raises:
            ValueError: the budget is below what the method reaches at sparsity 1.
        """
        if not (isinstance(budget, (int, float)) and 0.0 < budget <= 1.0):
            raise ValueError(f"budget must be in (0, 1], got {budget!r}")
        windows = self.holdout if windows is None else windows
        if windows is None:
            raise ValueError("no held-out windows to measure FLOPs on: pass windows=...")
        lo_s, hi_s = 0.0, 1.0
        e0, e1 = self.expected_ratio(0.0), self.expected_ratio(1.0)
        if budget < e1:
            raise ValueError(f"budget {budget} is below the cheapest {self.method} configuration "
                             f"({e1:.4f} of the dense FLOPs at sparsity 1)")
        slope = e1 - e0  # d ratio / d sparsity on calibration text
        s = min(max((budget - e0) / slope, 0.0), 1.0)
        tried: list[tuple[float, float]] = []
        for _ in range(max_steps):
            r = measured_ratio(self.model, self.plan_at(s), windows)
            tried.append((s, r))
            log.info("%s: sparsity %.4f -> measured ratio %.4f (budget %.3f)", self.method, s, r, budget)
            if abs(r - budget) <= tolerance:
                break
            if r > budget:
                lo_s = max(lo_s, s)
            else:
                hi_s = min(hi_s, s)
            if len(tried) >= 2 and tried[-1][1] != tried[-2][1]:
                (s_a, r_a), (s_b, r_b) = tried[-2], tried[-1]
                slope = (r_b - r_a) / (s_b - s_a)
            nxt = s + (budget - r) / slope if slope < 0 else 0.5 * (lo_s + hi_s)
            s = nxt if lo_s < nxt < hi_s else 0.5 * (lo_s + hi_s)
        s, r = min(tried, key=lambda t: abs(t[1] - budget))
        plan = self.plan_at(s)
        plan.budget = budget
        plan.meta.update({"measured_ratio_holdout": r, "search_steps": len(tried)})
        return plan


def _activation_stats(model, windows, sample_tokens, batch_size):
    linears = candidate_linears(model)
    stats = collect(model, windows, linears=linears, batch_size=batch_size, sample_tokens=sample_tokens,
                    rank_min_aspect=math.inf)
    order = []
    for site in stats.sites:
        order += site.members
    order += [n for n in linears if n not in order]
    return linears, stats, order


def _split(windows: torch.Tensor, holdout_windows: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    if windows.dim() < 2:
        raise ValueError(f"calibration data must be windows [N, L] (or inputs [N, ...]), got shape "
                         f"{tuple(windows.shape)}")
    return split_holdout(windows, holdout_windows)


def _dense_unit(path: str, linear: LinearModule) -> UnitPlan:
    return UnitPlan(path, (path,), (linear.out_features,), linear.in_features)


def teal(model: torch.nn.Module, windows: torch.Tensor, *, holdout_windows: int = 4, sample_tokens: int = 4096,
         batch_size: int = 4) -> SparsityBaseline:
    """TEAL-style input sparsity on every linear input site, thresholds from dense calibration quantiles.

    Args:
        model: an HF causal LM or any module with ``nn.Linear`` layers (not modified).
        windows: calibration token windows ``[N, L]`` (or float inputs ``[N, ..., n]`` for a module
            that takes them); ``holdout_windows`` of them (``ranapass.data.split_holdout``) are kept out of
            the statistics and used by ``plan(budget)`` to measure FLOPs.
        sample_tokens: input rows sampled per site for the quantiles.

    Example::

        baseline = ranapass.baselines.teal(model, ranapass.calibration_windows(tok, num_windows=16))
        plan = baseline.plan(0.56)
    """
    data, holdout = _split(windows, holdout_windows)
    model.eval()
    linears, stats, order = _activation_stats(model, data, sample_tokens, batch_size)
    units = []
    for site in stats.sites:
        members = tuple(site.members)
        n = site.in_features
        outs = tuple(site.out_features)

        def make(tau, members=members, outs=outs, n=n):
            return NeuronAdapterSpec(members, outs, n, tau, weighted=False,
                                     thresholds=torch.full((n,), tau, dtype=torch.float32))

        name = members[0] if len(members) == 1 else stack_name(members)
        units.append(_SparseUnit(name, members, outs, n, _Quantiles.of(site.sample.abs()), make, n))
    placed = {m for u in units for m in u.members}
    dense = [_dense_unit(p, lin) for p, lin in linears.items() if p not in placed]
    meta = {"method": "TEAL-style: neuron adapters on every input site, score |x|, one cutoff per site at a "
                      "uniform sparsity from dense calibration quantiles",
            "data": f"{stats.windows} windows, {stats.tokens} tokens", "linear_order": order}
    return SparsityBaseline(model, "teal", units, dense, holdout, meta)


def cats(model: torch.nn.Module, windows: torch.Tensor, *, holdout_windows: int = 4, sample_tokens: int = 4096,
         batch_size: int = 4) -> SparsityBaseline:
    """CATS-style MLP sparsity: cutoffs on ``|act(gate x)|`` per layer, from dense calibration quantiles.

    Arguments as for :func:`teal`. Raises ``ValueError`` if the model has no gated MLP.
    """
    data, holdout = _split(windows, holdout_windows)
    model.eval()
    linears, stats, order = _activation_stats(model, data, sample_tokens, batch_size)
    mlps = find_gated_mlps(model, data[:1, :64], linears)
    if not mlps:
        raise ValueError(f"{type(model).__name__} has no gated MLP (act(gate x) * up x -> down): CATS needs one")
    site_of = {m: s for s in stats.sites for m in s.members}
    units = []
    for mlp in mlps:
        g_lin, d_lin = linears[mlp.gate], linears[mlp.down]
        bias = None if g_lin.module.bias is None else g_lin.module.bias.detach().cpu()
        scores = gate_magnitudes(site_of[mlp.gate].sample.cpu(), g_lin.weight.detach().cpu(), bias, mlp.activation)
        d, n = g_lin.out_features, g_lin.in_features

        def make_gate(tau, mlp=mlp, d=d, n=n):
            return GatedMaskAdapterSpec((mlp.gate, mlp.up), (d, d), n, tau, activation=mlp.activation,
                                        thresholds=torch.full((d,), tau, dtype=torch.float32))

        def make_down(_tau, mlp=mlp, d=d, m=d_lin.out_features):
            # keep exactly the non-zero inputs: the units whose up row the gate kept
            tiny = torch.finfo(torch.float32).tiny
            return NeuronAdapterSpec((mlp.down,), (m,), d, tiny, weighted=False, thresholds=torch.full((d,), tiny))

        units.append(_SparseUnit(stack_name((mlp.gate, mlp.up)), (mlp.gate, mlp.up), (d, d), n,
                                 _Quantiles.of(scores), make_gate, d))
        units.append(_SparseUnit(mlp.down, (mlp.down,), (d_lin.out_features,), d, None, make_down, d))
    placed = {m for u in units for m in u.members}
    dense = [_dense_unit(p, lin) for p, lin in linears.items() if p not in placed]
    meta = {"method": "CATS-style: MLP only, cutoff on |act(gate x)| per layer at a uniform sparsity from dense "
                      "calibration quantiles; up rows and down columns of dropped units skipped",
            "data": f"{stats.windows} windows, {stats.tokens} tokens", "linear_order": order}
    return SparsityBaseline(model, "cats", units, dense, holdout, meta)

