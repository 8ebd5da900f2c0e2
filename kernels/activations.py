"""The gated-MLP activations ``act`` of ``h = act(gate) * up``: one table for every layer that names them.

Each entry gives the constexpr code of the fused GATED prologue (masked_gemv.py, which implements the
same math in Triton), the torch function that is its reference, and the torch call a traced graph
holds for it (``call_name`` maps such a call back to the name, for the FX pass).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["GatedActivation", "ACTIVATIONS", "lookup", "gated_activation", "call_name"]


@dataclasses.dataclass(frozen=True)
class GatedActivation:
    """One gate activation.

    Args:
        code: its ``ACTIVATION`` constexpr in the GATED prologue of the masked GEMV kernel.
        fn: ``act(gate)`` in torch, the reference every other path must equal.
        approximate: the ``approximate`` argument of ``F.gelu`` that names it in a graph, or None (SiLU).
    """

    code: int
    fn: Callable[[torch.Tensor], torch.Tensor]
    approximate: str | None = None


ACTIVATIONS: dict[str, GatedActivation] = {
    "silu": GatedActivation(0, F.silu),
    "gelu_tanh": GatedActivation(1, lambda t: F.gelu(t, approximate="tanh"), "tanh"),
    "gelu": GatedActivation(2, F.gelu, "none"),
}

_SILU_CALLS = (F.silu, torch._C._nn.silu)  # F.gelu is torch._C._nn.gelu itself


def lookup(name: str) -> GatedActivation:
    """The table entry of ``name``; a ValueError naming the known activations otherwise."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown gated activation {name!r}; expected one of {', '.join(map(repr, ACTIVATIONS))}")
    return ACTIVATIONS[name]


def gated_activation(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """``act(gate) * up`` for the gated MLPs (SwiGLU, GeGLU), the input of a down-projection adapter."""
    return lookup(activation).fn(gate) * up


def call_name(target: Any, kwargs: Mapping[str, Any]) -> str | None:
    """The activation name of a traced call ``target(x, **kwargs)`` (``F.silu``, ``F.gelu``), else None.

    In-place SiLU and unknown keyword arguments are not matched.
    """
    if target in _SILU_CALLS:
        return None if kwargs.get("inplace", False) else "silu"
    if target is torch._C._nn.gelu and set(kwargs) <= {"approximate"}:
        approximate = kwargs.get("approximate", "none")
        return next((name for name, a in ACTIVATIONS.items() if a.approximate == approximate), None)
    return None
