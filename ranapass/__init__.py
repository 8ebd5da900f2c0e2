"""ranapass: RaNA adapters as a torch.compile backend.

Calibrate once (``profile``), allocate ranks globally under a FLOP budget (``Profile.plan``),
``attach`` the plan, then ``torch.compile(model, backend=ranapass.rana_backend)``.

The names below are imported on first use (PEP 562), so ``import ranapass.kernels`` or
``ranapass.cost_model`` loads neither transformers nor sympy.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ranapass.adapters import AdapterSpec, NeuronAdapterSpec, RankAdapterSpec, register_adapter
    from ranapass.attach import Attachment, FlopMeter, attach, detach
    from ranapass.backend import RanaBackend, rana_backend
    from ranapass.bias_step import bias_step
    from ranapass.data import calibration_windows, evaluation_windows, load_texts, token_windows
    from ranapass.diff import GraphDiff, diff
    from ranapass.evaluate import AdaptedResult, PerplexityResult, adapted_perplexity, perplexity
    from ranapass.fingerprint import weights_fingerprint
    from ranapass.rewrite_report import RewriteError, RewriteReport
    from ranapass.generation import CompiledGenerator
    from ranapass.lora import LoraAdapter, LoraCalibration, LoraCompression, calibrate_lora, compress_lora, load_lora
    from ranapass.models import load_model
    from ranapass.plan import Plan, PlanMismatchError, UnitPlan
    from ranapass.planning import PlanOptions
    from ranapass.profiling import Profile, ProfileOptions, profile
    from ranapass.recovery import recover

_EXPORTS: dict[str, str] = {
    "AdaptedResult": "ranapass.evaluate",
    "AdapterSpec": "ranapass.adapters",
    "Attachment": "ranapass.attach",
    "CompiledGenerator": "ranapass.generation",
    "FlopMeter": "ranapass.attach",
    "GraphDiff": "ranapass.diff",
    "LoraAdapter": "ranapass.lora",
    "LoraCalibration": "ranapass.lora",
    "LoraCompression": "ranapass.lora",
    "NeuronAdapterSpec": "ranapass.adapters",
    "PerplexityResult": "ranapass.evaluate",
    "Plan": "ranapass.plan",
    "PlanMismatchError": "ranapass.plan",
    "PlanOptions": "ranapass.planning",
    "Profile": "ranapass.profiling",
    "ProfileOptions": "ranapass.profiling",
    "RanaBackend": "ranapass.backend",
    "RankAdapterSpec": "ranapass.adapters",
    "RewriteError": "ranapass.rewrite_report",
    "RewriteReport": "ranapass.rewrite_report",
    "UnitPlan": "ranapass.plan",
    "adapted_perplexity": "ranapass.evaluate",
    "attach": "ranapass.attach",
    "calibrate_lora": "ranapass.lora",
    "calibration_windows": "ranapass.data",
    "bias_step": "ranapass.bias_step",
    "compress_lora": "ranapass.lora",
    "detach": "ranapass.attach",
    "diff": "ranapass.diff",
    "evaluation_windows": "ranapass.data",
    "load_lora": "ranapass.lora",
    "load_model": "ranapass.models",
    "load_texts": "ranapass.data",
    "perplexity": "ranapass.evaluate",
    "profile": "ranapass.profiling",
    "rana_backend": "ranapass.backend",
    "recover": "ranapass.recovery",
    "register_adapter": "ranapass.adapters",
    "token_windows": "ranapass.data",
    "weights_fingerprint": "ranapass.fingerprint",
}
"""Public name -> the module that defines it."""

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import a public name's module on first access and cache the name in this module."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """This package's module type: a submodule named like the function it defines (``attach``, ``diff``)
    is bound on the package when it is imported; the package's attribute stays the function."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == value.__name__:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
