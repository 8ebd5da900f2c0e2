"""The adapter-kind registry: what every kind provides, and the table of known kinds.

A *unit* is one or more linears that read the same input (q/k/v, or a single linear) and are
replaced together: their weights are stacked along the output dimension, so one mask serves them
all and the adapter produces the concatenated output. A kind is an ``AdapterSpec`` subclass that
holds everything kind-specific in one place:

- the spec: calibrated tensors (device-free, float32), config and FLOPs, as a plan saves them;
- its scores: ``magnitudes`` (per entry, compared with the thresholds) and ``entry_norms`` (the
  weight of each entry in the score ``magnitude * norm``, so ``thresholds = tau / norm``), used by
  threshold fitting;
- its reference forward ``reference(x, *operands, *constants)`` and the ``operands`` it reads from
  the model's weights;
- ``from_candidate``: the adapter of one candidate of a profile's curve of this kind;
- an optional output correction (``out_scale``, ``out_bias``: ``y' = out_scale * y + out_bias`` per
  output, fitted by ``ranapass.recovery``), folded into the operand named ``output_operand``;
- its ``lowering``: the ``torch.ops.ranapass`` ops that run it, or None, in which case the FX pass
  traces the reference math into the graph.

Specs are data: this package imports no kernel. ``ranapass.bound`` makes a spec runnable on a model.
New kinds register with ``@register_adapter``; plans, attach, threshold fitting and the FX pass need
no change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ranapass.cost_model import flops
from ranapass.errors import RanapassError

if TYPE_CHECKING:
    from ranapass.candidates import UnitCandidates

__all__ = ["ADAPTER_KINDS", "register_adapter", "AdapterSpec", "Lowering", "kernel_reference", "per_entry_thresholds",
           "stack_bias"]

ADAPTER_KINDS: dict[str, type[AdapterSpec]] = {}


def register_adapter(cls: type[AdapterSpec]) -> type[AdapterSpec]:
    """Class decorator: make an adapter kind known to plan loading, ``attach`` and the FX pass."""
    if cls.kind in ADAPTER_KINDS:
        raise ValueError(f"adapter kind {cls.kind!r} is already registered by {ADAPTER_KINDS[cls.kind].__name__}")
    ADAPTER_KINDS[cls.kind] = cls
    return cls


@dataclasses.dataclass(frozen=True)
class Lowering:
    """The ``torch.ops.ranapass`` ops that run a kind, by name (``ranapass.bound`` looks them up).

    Args:
        op: ``op(x, *operands, [tickets], *constants)`` computes the unit's stacked output.
        tickets: the op also takes its decode kernels' ticket buffer (zeroed int32, kept zero) after
            the operands; the bound adapter owns one.
        gated_op: ``gated_op(gate, up, *operands, [tickets], *constants, activation)`` computes the
            kind on ``act(gate) * up`` with the MLP middle fused (single-member units), or None.
        pair_op: ``pair_op(x, *args_1, *args_2)`` computes two units of the kind that read one input
            in shared launches (both with a bias or neither), returning both outputs, or None.
    """

    op: str
    tickets: bool = False
    gated_op: str | None = None
    pair_op: str | None = None


class kernel_reference:  # noqa: N801 (used like a function, as a class attribute)
    """A kind's ``reference`` that lives in ``ranapass.kernels.reference`` (plain torch), imported on first use.

    The kernels' own reference is the one every path must equal; importing it lazily keeps specs data.
    Assign it without an annotation (a dataclass reads annotated class attributes at class creation).
    """

    def __init__(self, name: str):
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Callable[..., torch.Tensor]:
        from ranapass.kernels import reference

        return getattr(reference, self.name)


def per_entry_thresholds(tau: float, norms: torch.Tensor) -> torch.Tensor:
    """Per-entry thresholds ``tau / norm`` (float32; never kept where the norm is 0)."""
    norms = norms.float()
    return torch.where(norms > 0, tau / norms.clamp_min(1e-30), torch.full_like(norms, float("inf")))


def stack_bias(biases: Sequence[torch.Tensor | None], out_features: Sequence[int],
               like: torch.Tensor) -> torch.Tensor | None:
    """The members' biases stacked like their outputs (zeros for a member without one), or None if none has one."""
    if all(b is None for b in biases):
        return None
    parts = [b if b is not None else like.new_zeros(m) for b, m in zip(biases, out_features)]
    return torch.cat([p.detach() for p in parts]).to(like.dtype)


@dataclasses.dataclass
class AdapterSpec:
    """Common part of every adapter: which linears it replaces and its shape.

    Every kind also has ``thresholds`` (``[width]`` float32, compared with ``magnitudes``) and its
    operands include ``"thresholds"`` and ``"bias"`` (the stacked bias, or None).

    Args:
        members: module paths of the replaced linears, in the order their outputs are stacked.
        out_features: output width of each member.
        in_features: the shared input width.
        tau: the scalar threshold on the score (the per-entry thresholds derive from it).
        out_scale, out_bias: an output correction ``[out_total]`` float32 (both or neither; None: none).
            ``bind`` folds it into the operands: the scale into the columns of ``output_operand``
            (whose last dimension is the stacked output), the bias into ``bias``. It costs no FLOPs.
    """

    kind: ClassVar[str] = ""
    lowering: ClassVar[Lowering | None] = None
    output_operand: ClassVar[str | None] = None
    """The operand whose last dimension is the stacked output (None: the kind takes no output correction)."""
    tensor_names: ClassVar[tuple[str, ...]] = ()
    """The calibrated tensor fields, as a plan saves them (the other fields are JSON settings)."""
    members: tuple[str, ...]
    out_features: tuple[int, ...]
    in_features: int
    tau: float
    out_scale: torch.Tensor | None = None
    out_bias: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.members = tuple(self.members)
        self.out_features = tuple(int(m) for m in self.out_features)
        if len(self.members) != len(self.out_features) or not self.members:
            raise ValueError(f"{type(self).__name__}: members {self.members} and out_features "
                             f"{self.out_features} must be non-empty and of equal length")
        if (self.out_scale is None) != (self.out_bias is None):
            raise ValueError(f"{type(self).__name__} {self.members}: an output correction needs out_scale and "
                             "out_bias, or neither")
        if self.out_scale is not None:
            if self.output_operand is None:
                raise ValueError(f"adapter kind {self.kind!r} takes no output correction")
            for name, t in (("out_scale", self.out_scale), ("out_bias", self.out_bias)):
                if t.shape != (self.out_total,):
                    raise ValueError(f"{type(self).__name__} {self.members}: {name} of shape {tuple(t.shape)}, "
                                     f"expected ({self.out_total},)")

    # ------------------------------------------------------------------ data
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
        return flops.dense_linear(self.out_total, self.in_features)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Calibrated tensors, as saved in a plan (the output correction's are in ``correction``)."""
        return {name: getattr(self, name) for name in self.tensor_names}

    def correction(self) -> dict[str, torch.Tensor]:
        """The output correction's tensors, as saved in a plan (empty when there is none)."""
        if self.out_scale is None:
            return {}
        return {"out_scale": self.out_scale, "out_bias": self.out_bias}

    def corrected(self, operands: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
        """``operands`` with the output correction folded in: ``W' = W * out_scale`` over the output
        dimension of ``output_operand``, ``bias' = out_scale * bias + out_bias``, in the weights' dtype."""
        if self.out_scale is None:
            return operands
        w = operands[self.output_operand]
        scale = self.out_scale.to(w.device, torch.float32)
        bias = self.out_bias.to(w.device, torch.float32)
        if operands["bias"] is not None:
            bias = bias + scale * operands["bias"].float()
        return {**operands, self.output_operand: (w.float() * scale).to(w.dtype).contiguous(),
                "bias": bias.to(w.dtype)}

    def config(self) -> dict[str, Any]:
        """JSON-able description, as saved in a plan."""
        return {"kind": self.kind, "members": list(self.members), "out_features": list(self.out_features),
                "in_features": self.in_features, "tau": float(self.tau)}

    @classmethod
    def from_saved(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> AdapterSpec:
        fields = {k: v for k, v in config.items() if k != "kind"}
        return cls(**fields, **tensors)

    @classmethod
    def from_candidate(cls, unit: UnitCandidates, index: int, weight: torch.Tensor) -> AdapterSpec:
        """The adapter of candidate ``index`` of ``unit.curves[kind]``; ``weight`` is the stacked float32 weight."""
        raise RanapassError(f"adapter kind {cls.kind!r} has no profile candidates; build its specs directly")

    # ------------------------------------------------------------------ math on the bound operands
    def operands(self, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
                 ) -> dict[str, torch.Tensor | None]:
        """The reference's tensor arguments after ``x``, for the model's member weights (their device and dtype)."""
        raise NotImplementedError

    def constants(self) -> tuple[Any, ...]:
        """Non-tensor arguments of the reference (and the op) after the tensors."""
        return ()

    reference: ClassVar[Callable[..., torch.Tensor]]
    """``reference(x, *operands, *constants)``: the stacked output in ``x.dtype`` (float32 math)."""

    def magnitudes(self, x: torch.Tensor, operands: dict[str, torch.Tensor | None]) -> torch.Tensor:
        """Per-token values of the maskable entries, ``[..., width]`` float32: an entry is kept when its
        magnitude is at least its threshold."""
        raise NotImplementedError

    def entry_norms(self, operands: dict[str, torch.Tensor | None]) -> torch.Tensor:
        """``[width]`` float32 weights of the entries in the score ``magnitude * norm`` that ``tau`` cuts."""
        raise NotImplementedError

    def scores(self, x: torch.Tensor, operands: dict[str, torch.Tensor | None]) -> torch.Tensor:
        """``magnitude * norm`` per token and entry: kept iff ``score >= tau`` (thresholds ``tau / norm``)."""
        return self.magnitudes(x, operands) * self.entry_norms(operands)

    def check_weights(self, weights: Sequence[torch.Tensor]) -> None:
        """Raise unless ``weights`` are the members' weights this adapter was made for (by shape)."""
        shapes = [tuple(w.shape) for w in weights]
        want = [(m, self.in_features) for m in self.out_features]
        if shapes != want:
            raise ValueError(f"adapter for {self.members} expects weights of shapes {want}, got {shapes}: "
                             "the plan was made for another model")
