"""Refuse a plan made for other weights, before any expensive work on it (every entry point that takes a plan)."""

from __future__ import annotations

import torch

from ranapass.fingerprint import weights_fingerprint
from ranapass.plan import Plan, PlanMismatchError

__all__ = ["check_plan_fits"]


def check_plan_fits(model: torch.nn.Module, plan: Plan) -> None:
    """Raise ``PlanMismatchError`` unless ``plan`` was made for ``model``'s weights (``weights_fingerprint``)."""
    fp = weights_fingerprint(model)
    if fp != plan.fingerprint:
        raise PlanMismatchError(f"plan was made for weights {plan.fingerprint}, this model has {fp}: "
                                "profile this model and plan again")
