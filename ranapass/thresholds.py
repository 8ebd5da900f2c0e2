"""Re-fit adapter thresholds on held-out tokens of the *adapted* model.

Candidate curves are measured on dense-model inputs, but once earlier layers are adapted every later
unit sees slightly different inputs and keeps a different number of ranks, so the measured FLOPs
drift from the plan. Fitting runs the held-out windows once through the eagerly adapted model; in
execution order each unit sets its threshold so that it keeps exactly its planned count per token
on the inputs it actually receives (its upstream units are already fitted by then).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ranapass.adapters.registry import per_entry_thresholds
from ranapass.attach import temporarily_attached
from ranapass.bound import BoundAdapter
from ranapass.calibrate import run_model
from ranapass.hooks import forward_hooks
from ranapass.plan import Plan, UnitPlan

__all__ = ["fit_thresholds"]

log = logging.getLogger(__name__)


_MAX_SCORES = 1 << 16


def _quantile_threshold(scores: torch.Tensor, keep_fraction: float, seed: int = 0) -> float:
    """Smallest tau with ``mean(scores >= tau) ~= keep_fraction`` (0 keeps everything).

    Above 2^16 scores, the quantile is taken on a fixed random subset of that size: its standard error in
    one unit's kept fraction is at most 0.2% (0.5 / 256), and across a plan's units these errors average
    out, far below the drift of the kept fractions between texts (benchmarks/RESULTS.md, plan speed).
    """
    flat = scores.reshape(-1).float()
    if flat.numel() > _MAX_SCORES:
        g = torch.Generator(device=flat.device).manual_seed(seed)
        flat = flat[torch.randint(flat.numel(), (_MAX_SCORES,), generator=g, device=flat.device)]
    keep = int(round(keep_fraction * flat.numel()))
    if keep >= flat.numel():
        return 0.0
    if keep <= 0:
        return float(flat.max()) * 1.0001 + 1e-30
    # the keep-th largest score: a linear-time selection, not a sort
    return float(torch.kthvalue(flat, flat.numel() - keep + 1).values)


@torch.no_grad()
def fit_thresholds(model: torch.nn.Module, plan: Plan, windows: Any, *, seed: int = 0) -> dict[str, float]:
    """Set every adapter's threshold so it keeps its planned count on ``windows``. Mutates ``plan``.

    Args:
        model: the model ``plan`` was made for.
        plan: its adapters' ``tau``/``thresholds`` are replaced in place.
        windows: one batch of held-out inputs (token windows ``[N, L]`` or a model input).
        seed: seed of the score subsample each quantile is taken on (``benchmarks/fit_noise.py`` measures
            how much perplexity moves with it).

    Returns:
        ``{unit name: fitted tau}``.
    """
    fitted: dict[str, float] = {}

    def hook(unit: UnitPlan, bound: BoundAdapter):

        def pre(module, args):
            spec, buffers = unit.adapter, bound.buffers
            tau = _quantile_threshold(spec.scores(args[0].detach(), buffers), unit.expected_kept / spec.width, seed)
            thresholds = per_entry_thresholds(tau, spec.entry_norms(buffers))
            buffers["thresholds"].copy_(thresholds)
            spec.thresholds = thresholds.cpu()
            spec.tau = tau
            fitted[unit.name] = tau
        return pre

    with temporarily_attached(model, plan) as attachment:
        hooks = [(model.get_submodule(unit.members[0]), hook(unit, attachment.refs[unit.members[0]].adapter))
                 for unit in plan.adapted]
        with forward_hooks(hooks, pre=True):
            run_model(model, windows.to(next(model.parameters()).device) if isinstance(windows, torch.Tensor)
                      else windows)
    missing = [u.name for u in plan.adapted if u.name not in fitted]
    if missing:
        log.warning("%d adapted units never ran on the held-out windows; thresholds left as calibrated: %s",
                    len(missing), missing[:8])
    return fitted
