"""Bound adapters: a plan's adapter spec made runnable on one model's weights (the runtime side of a kind).

``bind`` reads the kind's operands off the member weights (on their device and dtype), folds the
spec's output correction into them (``AdapterSpec.corrected``), gives an op
that needs one its ticket buffer, and looks the kind's ``torch.ops.ranapass`` op up; a kind without
one runs its reference math (eagerly here, traced into the graph by the FX pass).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ranapass.adapters import AdapterSpec
from ranapass.kernels import ops as _ops  # noqa: F401  (registers torch.ops.ranapass.*)
from ranapass.kernels.neuron_adapter import ticket_buffer

__all__ = ["BoundAdapter", "bind", "ranapass_op"]


def ranapass_op(name: str) -> torch._ops.OpOverload:
    """``torch.ops.ranapass.<name>.default``."""
    return getattr(torch.ops.ranapass, name).default


class BoundAdapter:
    """An adapter ready to run on one model: ``op(x, *buffers.values(), *constants)`` is the stacked output.

    ``op`` is the kind's ``torch.ops.ranapass`` op, or its reference function for a kind without one.
    ``buffers`` are the op's tensor arguments after ``x`` (``None`` for an absent bias; a neuron
    adapter's ``tickets`` are its decode kernel's workspace, which every call leaves zero); the FX pass
    registers them on the compiled graph, the eager path passes them directly. ``constants`` are the
    non-tensor arguments after them (a gate activation). ``model_bias`` is the members' stacked bias as
    bound (None if they have none), before any output correction: what the FX pass checks a graph's bias against.
    """

    def __init__(self, spec: AdapterSpec, op: Callable[..., torch.Tensor], buffers: dict[str, torch.Tensor | None],
                 operand_names: Sequence[str], model_bias: torch.Tensor | None):
        self.spec = spec
        self.model_bias = model_bias
        self.op = op
        self.buffers = buffers
        self.constants: tuple[Any, ...] = spec.constants()
        self._operand_names = tuple(operand_names)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return self.reference(x)  # the ops are for inference; the reference is differentiable (masks constant)
        return self.op(x, *self.buffers.values(), *self.constants)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The kind's reference math on the bound operands."""
        return self.spec.reference(x, *(self.buffers[k] for k in self._operand_names), *self.constants)

    def kept(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token count of kept entries (ranks or inputs), ``[...]`` int64."""
        return (self.spec.magnitudes(x, self.buffers) >= self.buffers["thresholds"].float()).sum(-1)

    def member_slices(self) -> list[slice]:
        """Where each member's output sits in the stacked output."""
        out, start = [], 0
        for m in self.spec.out_features:
            out.append(slice(start, start + m))
            start += m
        return out


def bind(spec: AdapterSpec, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None]) -> BoundAdapter:
    """Make ``spec`` runnable for the model's member weights and biases (same device and dtype)."""
    spec.check_weights(weights)
    operands = spec.operands(weights, biases)
    buffers = spec.corrected(operands)
    names = tuple(buffers)
    lowering = spec.lowering
    if lowering is None:
        return BoundAdapter(spec, type(spec).reference, buffers, names, operands["bias"])
    if lowering.tickets:
        buffers["tickets"] = ticket_buffer(spec.out_total, weights[0].device)
    return BoundAdapter(spec, ranapass_op(lowering.op), buffers, names, operands["bias"])
