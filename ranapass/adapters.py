"""Adapter kinds: what a plan stores for one adapted unit, and how it runs once bound to a model.

A *unit* is one or more linears that read the same input (q/k/v, or a single linear) and are
replaced together: their weights are stacked along the output dimension, so one mask serves them
all and the op produces the concatenated output. An ``AdapterSpec`` holds the calibrated tensors
(device-free, float32); ``bind`` turns it into a ``BoundAdapter`` on the model's device and dtype,
which the eager path calls and the FX pass lowers to a ``torch.ops.ranapass`` op.

New kinds register with ``@register_adapter``; plans, attach and the FX pass need no change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from ranapass.cost_model import flops as F
from ranapass.kernels import ops as _ops  # noqa: F401  (registers torch.ops.ranapass.*)
from ranapass.kernels.neuron_adapter import ticket_buffer
from ranapass.kernels.reference import (neuron_adapter_keep, neuron_adapter_reference, rank_adapter_reference,
                                        rank_adapter_scores)

__all__ = [
    "ADAPTER_KINDS",
    "register_adapter",
    "AdapterSpec",
    "RankAdapterSpec",
    "NeuronAdapterSpec",
    "BoundAdapter",
]

ADAPTER_KINDS: dict[str, type[AdapterSpec]] = {}


def register_adapter(cls: type[AdapterSpec]) -> type[AdapterSpec]:
    """Class decorator: make an adapter kind known to plan loading, ``attach`` and the FX pass."""
    if cls.kind in ADAPTER_KINDS:
        raise ValueError(f"adapter kind {cls.kind!r} is already registered by {ADAPTER_KINDS[cls.kind].__name__}")
    ADAPTER_KINDS[cls.kind] = cls
    return cls


@dataclasses.dataclass
class AdapterSpec:
    """Common part of every adapter: which linears it replaces and its shape.

    Args:
        members: module paths of the replaced linears, in the order their outputs are stacked.
        out_features: output width of each member.
        in_features: the shared input width.
        tau: the scalar threshold on the score (the per-rank/per-input thresholds derive from it).
    """

    kind: ClassVar[str] = ""
    members: tuple[str, ...]
    out_features: tuple[int, ...]
    in_features: int
    tau: float

    def __post_init__(self) -> None:
        self.members = tuple(self.members)
        self.out_features = tuple(int(m) for m in self.out_features)
        if len(self.members) != len(self.out_features) or not self.members:
            raise ValueError(f"{type(self).__name__}: members {self.members} and out_features "
                             f"{self.out_features} must be non-empty and of equal length")

    @property
    def out_total(self) -> int:
        return sum(self.out_features)

    @property
    def width(self) -> int:
        """Number of maskable entries per token (ranks or inputs)."""
        raise NotImplementedError

    def flops(self, kept: float | Any) -> Any:
        """FLOP expression in T for ``kept`` entries kept per token (see cost_model/flops.py)."""
        raise NotImplementedError

    def dense_flops(self) -> Any:
        return F.dense_linear(self.out_total, self.in_features)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Calibrated tensors, as saved in a plan."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """JSON-able description, as saved in a plan."""
        return {"kind": self.kind, "members": list(self.members), "out_features": list(self.out_features),
                "in_features": self.in_features, "tau": float(self.tau)}

    @classmethod
    def from_saved(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> AdapterSpec:
        fields = {k: v for k, v in config.items() if k != "kind"}
        return cls(**fields, **tensors)

    def bind(self, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None]) -> BoundAdapter:
        """Make the runnable adapter for the model's member weights (same device and dtype)."""
        raise NotImplementedError

    def _check_weights(self, weights: Sequence[torch.Tensor]) -> None:
        shapes = [tuple(w.shape) for w in weights]
        want = [(m, self.in_features) for m in self.out_features]
        if shapes != want:
            raise ValueError(f"adapter for {self.members} expects weights of shapes {want}, got {shapes}: "
                             "the plan was made for another model")


def _stack_bias(biases: Sequence[torch.Tensor | None], out_features: Sequence[int],
                like: torch.Tensor) -> torch.Tensor | None:
    if all(b is None for b in biases):
        return None
    parts = [b if b is not None else like.new_zeros(m) for b, m in zip(biases, out_features)]
    return torch.cat([p.detach() for p in parts]).to(like.dtype)


@register_adapter
@dataclasses.dataclass
class RankAdapterSpec(AdapterSpec):
    """``y = At^T (keep * B x) + b``: data-aware low rank with per-token rank masks.

    Args:
        B: ``[rank, in_features]``, the first factor (always computed).
        At: ``[rank, out_total]``, A transposed (rank-major), so a dropped rank skips one row.
        thresholds: ``[rank]`` float32, ``tau / ||A[:, i]||``; ``0`` keeps every rank (static low rank).
    """

    kind: ClassVar[str] = "rank"
    B: torch.Tensor = None
    At: torch.Tensor = None
    thresholds: torch.Tensor = None

    def __post_init__(self) -> None:
        super().__post_init__()
        rank = self.B.shape[0]
        if self.B.shape != (rank, self.in_features) or self.At.shape != (rank, self.out_total) \
                or self.thresholds.shape != (rank,):
            raise ValueError(f"rank adapter {self.members}: inconsistent shapes B {tuple(self.B.shape)}, "
                             f"At {tuple(self.At.shape)}, thresholds {tuple(self.thresholds.shape)} "
                             f"for in {self.in_features}, out {self.out_total}")

    @property
    def rank(self) -> int:
        return self.B.shape[0]

    @property
    def width(self) -> int:
        return self.rank

    def flops(self, kept: float | Any) -> Any:
        return F.rank_adapter(self.out_total, self.in_features, self.rank, kept)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"B": self.B, "At": self.At, "thresholds": self.thresholds}

    def bind(self, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None]) -> BoundAdapter:
        self._check_weights(weights)
        w = weights[0]
        buffers = {
            "B": self.B.to(w.device, w.dtype).contiguous(),
            "At": self.At.to(w.device, w.dtype).contiguous(),
            "thresholds": self.thresholds.to(w.device, torch.float32).contiguous(),
            "bias": _stack_bias(biases, self.out_features, w),
        }
        return BoundAdapter(self, torch.ops.ranapass.rank_adapter.default, buffers)


@register_adapter
@dataclasses.dataclass
class NeuronAdapterSpec(AdapterSpec):
    """``y = W (keep * x) + b`` with ``keep = |x_j| >= thresholds_j``: input (activation) sparsity.

    Args:
        thresholds: ``[in_features]`` float32, ``tau / ||W[:, j]||`` over the stacked members' weights.
    The weight itself comes from the model when bound (stored transposed, input-major).
    """

    kind: ClassVar[str] = "neuron"
    thresholds: torch.Tensor = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.thresholds.shape != (self.in_features,):
            raise ValueError(f"neuron adapter {self.members}: thresholds of shape {tuple(self.thresholds.shape)}, "
                             f"expected ({self.in_features},)")

    @property
    def width(self) -> int:
        return self.in_features

    def flops(self, kept: float | Any) -> Any:
        return F.neuron_adapter(self.out_total, self.in_features, kept)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"thresholds": self.thresholds}

    def bind(self, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None]) -> BoundAdapter:
        self._check_weights(weights)
        w = weights[0]
        buffers = {
            "Wt": torch.cat([x.detach() for x in weights], dim=0).t().contiguous(),
            "thresholds": self.thresholds.to(w.device, torch.float32).contiguous(),
            "bias": _stack_bias(biases, self.out_features, w),
            "tickets": ticket_buffer(self.out_total, w.device),  # the decode kernel's workspace, kept zero
        }
        return BoundAdapter(self, torch.ops.ranapass.neuron_adapter.default, buffers)


class BoundAdapter:
    """An adapter ready to run on one model: ``op(x, *buffers.values())`` computes the stacked output.

    ``buffers`` are the op's tensor arguments after ``x`` (``None`` for an absent bias; a neuron
    adapter's ``tickets`` are its decode kernel's workspace, which every call leaves zero); the FX pass
    registers them on the compiled graph, the eager path passes them directly.
    """

    def __init__(self, spec: AdapterSpec, op: torch._ops.OpOverload, buffers: dict[str, torch.Tensor | None]):
        self.spec = spec
        self.op = op
        self.buffers = buffers

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            # The ops are for inference; the reference math is differentiable (masks are constants).
            b = self.buffers
            if isinstance(self.spec, RankAdapterSpec):
                return rank_adapter_reference(x, b["B"], b["At"], b["thresholds"], b["bias"])
            return neuron_adapter_reference(x, b["Wt"], b["thresholds"], b["bias"])
        return self.op(x, *self.buffers.values())

    def kept(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token count of kept ranks (rank adapter) or inputs (neuron adapter), ``[...]`` int64."""
        if isinstance(self.spec, RankAdapterSpec):
            _, keep = rank_adapter_scores(x, self.buffers["B"], self.buffers["thresholds"])
        else:
            keep = neuron_adapter_keep(x, self.buffers["thresholds"])
        return keep.sum(-1)

    def member_slices(self) -> list[slice]:
        """Where each member's output sits in the stacked output."""
        out, start = [], 0
        for m in self.spec.out_features:
            out.append(slice(start, start + m))
            start += m
        return out
