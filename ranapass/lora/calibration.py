"""Statistics of a LoRA adapter's modules on the fine-tuned model, for the calibrated errors.

With ``C = E[x xᵀ] = L Lᵀ`` over each module's inputs:

- ``error="output"`` charges a truncation ``E‖(ΔW - ΔW_k) x‖² = ‖(ΔW - ΔW_k) L‖²_F``, relative to the base
  layer's own output energy ``E‖W x‖²`` (a scale the loss does not see).
- ``error="fisher"`` charges the loss's own scale. To second order, with ``g = ∂loss/∂y`` the module's output
  gradient, truncating costs ``½ E[δyᵀ diag(g²) δy]`` for ``δy = (ΔW - ΔW_k) x``; with the Kronecker-factored
  approximation ``G = diag(E[g²])`` (independent of x) that is ``½ ‖G^½ (ΔW - ΔW_k) L‖²_F``. These errors
  are nats of loss, so they add across modules.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ranapass.calibrate import collect
from ranapass.errors import RanapassError
from ranapass.hooks import forward_hooks
from ranapass.linear_match import linear_module
from ranapass.lora.io import LoraAdapter, LoraFactors, load_lora

if TYPE_CHECKING:
    from peft import PeftModel

__all__ = ["LoraCalibration", "calibrate_lora", "check_calibration"]

CHOLESKY_RIDGE = 1e-6
"""Added to each input second moment's diagonal, relative to its mean: keeps ``L`` invertible for inputs
that never vary."""


@dataclasses.dataclass
class LoraCalibration:
    """Statistics of the adapted modules, measured on the fine-tuned model (see :func:`calibrate_lora`).

    Args:
        whiten: per module path, the Cholesky factor ``L`` of its input second moment ``E[x xᵀ] = L Lᵀ``
            (float64; modules reading the same input share one tensor).
        output_energy: per module path, ``E‖W x‖²`` of the base layer (the scale ``error="output"`` divides by).
        tokens: calibration tokens seen.
        grad_sq: per module path, ``E[g²]`` per output channel, g the gradient of the window's summed loss
            with respect to the module's output (float64 ``[m]``); empty unless measured (``gradient_data``).
    """

    whiten: dict[str, torch.Tensor]
    output_energy: dict[str, float]
    tokens: int
    grad_sq: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


def calibrate_lora(adapter: LoraAdapter | str | os.PathLike | PeftModel, model: torch.nn.Module, data: Any, *,
                   batch_size: int = 4, gradient_data: Any = None) -> LoraCalibration:
    """Measure the adapter's modules on the fine-tuned model, for ``compress_lora(error="output" | "fisher")``.

    The model runs with ``adapter`` applied (each base linear adds its update), whatever ``model`` holds:
    the truncation errors to measure are those of the fine-tuned model, whose loss the compressed adapter
    must keep. Its inputs are the inputs the adapted layers see, and the second-order expansion of the loss
    behind ``error="fisher"`` is taken around the fine-tuned weights, where the adapter's training drove the
    mean gradient towards zero, so the first-order term drops out and ``E[g²]`` (the empirical Fisher)
    stands for the curvature. A PEFT LoRA layer's output is ``base(x) + lora(x)``: the gradient at the base
    linear's output (where the hooks sit) is the layer's own. How these statistics compare with the base
    model's on the benchmark adapter: benchmarks/RESULTS.md, "LoRA compression".

    Args:
        adapter: the adapter (or its folder, or a ``PeftModel``) whose modules to measure.
        model: the base model the adapter was trained on (its adapted modules must be ``nn.Linear`` of the
            adapter's shapes), or a ``PeftModel`` on it (its own adapters are disabled; ``adapter`` is applied).
        data: calibration token windows ``[N, L]`` (e.g. :func:`ranapass.data.calibration_windows`), or an
            iterable of model inputs; at least as many tokens as the widest adapted input.
        batch_size: windows per forward.
        gradient_data: token windows for one backward pass each through the causal-LM loss, measuring the
            output gradients ``error="fisher"`` needs (e.g. ``data`` itself); None skips it.

    Example::

        model, tokenizer = ranapass.load_model()
        windows = ranapass.calibration_windows(tokenizer, num_windows=32)
        calibration = ranapass.calibrate_lora("my-adapter", model, windows, gradient_data=windows)
        result = ranapass.compress_lora("my-adapter", 0.25, error="fisher", calibration=calibration)
    """
    if not isinstance(adapter, LoraAdapter):
        adapter = load_lora(adapter)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    linears = {f.name: _base_linear(base, f) for f in adapter.modules}
    disabled = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    applied = forward_hooks((linears[f.name], _update_hook(f, linears[f.name].weight)) for f in adapter.modules)
    with disabled, applied:  # registered before collect's hooks, so those see the fine-tuned output
        stats = collect(base, data, linears={n: linear_module(m) for n, m in linears.items()}, batch_size=batch_size,
                        sample_tokens=0, rank_min_aspect=0.0, gradient_data=gradient_data)
    whiten, output_energy = {}, {}
    for site in stats.sites:
        gram = site.gram.cpu() / site.tokens
        ridge = CHOLESKY_RIDGE * float(gram.diagonal().mean()) + 1e-12
        L = torch.linalg.cholesky(gram + ridge * torch.eye(len(gram), dtype=gram.dtype))
        for name in site.members:
            whiten[name] = L
            output_energy[name] = float((linears[name].weight.detach().double().cpu() @ L).square().sum())
    return LoraCalibration(whiten, output_energy, stats.tokens, {m: g.cpu() for m, g in stats.grad_sq.items()})


def check_calibration(calibration: LoraCalibration, modules: Sequence[LoraFactors], error: str) -> None:
    """Raise if ``calibration`` lacks a module of the adapter, or the gradients ``error="fisher"`` needs."""
    missing = [f.name for f in modules if f.name not in calibration.whiten]
    if missing:
        raise RanapassError(f"the calibration does not cover {len(missing)} modules of the adapter, e.g. "
                            f"{missing[:3]}: calibrate this adapter with calibrate_lora")
    if error == "fisher":
        missing = [f.name for f in modules if f.name not in calibration.grad_sq]
        if missing:
            raise RanapassError(f"error='fisher' needs output gradients, and the calibration has none for "
                                f"{len(missing)} modules, e.g. {missing[:3]}: pass gradient_data to calibrate_lora")


def _base_linear(base: torch.nn.Module, factors: LoraFactors) -> torch.nn.Linear:
    """The base model's linear that ``factors`` adapts; raises if it is missing, not a linear or another shape."""
    try:
        module = base.get_submodule(factors.name)
    except AttributeError as e:
        raise RanapassError(f"the model has no module {factors.name!r}: pass the base model the adapter was "
                            "trained on") from e
    module = getattr(module, "base_layer", module)  # a PEFT LoRA layer wraps the base linear
    if factors.embedding or not isinstance(module, torch.nn.Linear):
        raise RanapassError(f"{factors.name!r} is a {type(module).__name__}: error='output' needs nn.Linear "
                            "modules (embedding LoRA is compressed data-free only)")
    if tuple(module.weight.shape) != factors.shape:
        raise RanapassError(f"{factors.name!r} has weight {tuple(module.weight.shape)} but the adapter's update is "
                            f"{factors.shape}: not the adapter's base model")
    return module


def _update_hook(factors: LoraFactors, weight: torch.Tensor) -> Callable:
    """A forward hook making a base linear compute its fine-tuned output ``W x + scale · B A x``."""
    A, B = (t.detach().to(weight.device, weight.dtype) for t in (factors.A, factors.B))

    def forward(module, args, out):
        return out + factors.scale * F.linear(F.linear(args[0], A), B)
    return forward
