"""Attach a plan to a model: register its adapters by weight identity, and run them eagerly on demand.

``attach`` changes no module: it binds each adapter to the model's weights and records, for every
member weight tensor, which adapter replaces it. The FX pass (``rana_backend``) looks weights up
here by identity, never by name. A layer offloaded by accelerate (``ranapass.offload``) is bound with
its weights onloaded for the moment, so its adapter's tensors live on its execution device; its
weight tensor is a fresh one at every forward, so it is registered by its module's identity instead
(``lookup`` finds the module whose weight the tensor is). ``Attachment.eager()`` swaps the forward of
the adapted linears (``nn.Linear``, ``Conv1D``) for the adapter while the context is open, for evaluation
without compiling (under an accelerate hook, the forward the hook wraps, so the hook still runs);
``FlopMeter`` counts the kept ranks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Iterator

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ranapass.attach_guard import renew
from ranapass.bound import BoundAdapter, bind
from ranapass.linear_match import linear_module
from ranapass.offload import is_offloaded, onloaded
from ranapass.plan import Plan, PlanMismatchError, UnitPlan
from ranapass.plan_check import check_plan_fits

__all__ = ["attach", "detach", "attachment_of", "lookup", "temporarily_attached", "AdapterRef", "Attachment",
           "FlopMeter"]


@dataclasses.dataclass(frozen=True)
class AdapterRef:
    """What replaces one linear: its unit's bound adapter and the member's position in it."""

    adapter: BoundAdapter
    member: int
    unit: UnitPlan

    @property
    def path(self) -> str:
        return self.unit.members[self.member]


# weight tensor -> AdapterRef. Keyed by identity: a WeakKeyDictionary would call Tensor.__eq__.
_REGISTRY: WeakIdKeyDictionary = WeakIdKeyDictionary()
# offloaded member module -> AdapterRef (its weight tensor is replaced at every forward).
_OFFLOADED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def lookup(weight: torch.Tensor) -> AdapterRef | None:
    """The adapter registered for this exact weight tensor, or for the offloaded module now holding it."""
    ref = _REGISTRY.get(weight)
    if ref is None:
        ref = next((r for m, r in _OFFLOADED.items() if m._parameters.get("weight") is weight), None)
    return ref


class Attachment:
    """A plan attached to a model. Returned by ``attach``; ``detach()`` undoes it."""

    def __init__(self, model: torch.nn.Module, plan: Plan, refs: dict[str, AdapterRef]):
        self._model = weakref.ref(model)
        self.plan = plan
        self.refs = refs  # member module path -> AdapterRef

    @property
    def model(self) -> torch.nn.Module:
        model = self._model()
        if model is None:
            raise RuntimeError("the model of this attachment no longer exists")
        return model

    @property
    def adapters(self) -> dict[str, BoundAdapter]:
        """Unit name -> bound adapter."""
        return {ref.unit.name: ref.adapter for ref in self.refs.values()}

    def detach(self) -> None:
        """Unregister every adapter of this plan (eager overrides are removed too)."""
        model = self._model()
        for path, ref in self.refs.items():
            if model is not None:
                module = model.get_submodule(path)
                _uninstall(module)
                _unregister(module, ref)
        self.refs = {}
        if model is not None and getattr(model, "_ranapass_attachment", None) is self:
            del model._ranapass_attachment
            renew(model)

    @contextlib.contextmanager
    def eager(self) -> Iterator[Attachment]:
        """Run the adapted linears through their adapters (not their dense weights) inside the context.

        Example::

            with ranapass.attach(model, plan).eager():
                logits = model(ids).logits
        """
        model = self.model
        installed = []
        caches: dict[int, list] = {}
        try:
            for path, ref in self.refs.items():
                module = model.get_submodule(path)
                _install(module, _adapted_forward(ref, caches.setdefault(id(ref.adapter), [None, None])))
                installed.append(module)
            yield self
        finally:
            for module in installed:
                _uninstall(module)
            caches.clear()


def attach(model: torch.nn.Module, plan: Plan, *, check_fingerprint: bool = True) -> Attachment:
    """Register the plan's adapters for ``model``'s weights. Mutates only ranapass's registry.

    Any previous attachment of ``model`` is detached first. Nothing is registered unless every
    adapter binds (right module paths, shapes, fingerprint).

    Args:
        model: the model the plan was made for (any device and dtype).
        plan: from ``Profile.plan`` or ``Plan.load``.
        check_fingerprint: refuse a plan made for other weights (default True).

    Example::

        plan = ranapass.profile(model, texts).plan(budget=0.56)
        ranapass.attach(model, plan)
        fast = torch.compile(model, backend=ranapass.rana_backend)
    """
    if check_fingerprint:
        check_plan_fits(model, plan)
    refs: dict[str, AdapterRef] = {}
    for unit in plan.adapted:
        modules = []
        for path in unit.members:
            try:
                module = model.get_submodule(path)
            except AttributeError as e:
                raise PlanMismatchError(f"plan unit {unit.name!r} names {path!r}, which this model lacks") from e
            linear = linear_module(module)
            if linear is None:
                raise PlanMismatchError(f"{path!r} is a {type(module).__name__}, not a linear (nn.Linear or Conv1D); "
                                        "the plan was made for another model")
            modules.append(linear)
        # The adapters' math works on (out, in) weights; the registry keys the weights as stored.
        with onloaded(m.module for m in modules):
            bound = bind(unit.adapter, [m.weight for m in modules], [getattr(m.module, "bias", None) for m in modules])
        for i, path in enumerate(unit.members):
            refs[path] = AdapterRef(bound, i, unit)
    detach(model)
    for path, ref in refs.items():
        _register(model.get_submodule(path), ref)
    attachment = Attachment(model, plan, refs)
    model._ranapass_attachment = attachment
    renew(model)
    return attachment


def attachment_of(model: torch.nn.Module) -> Attachment | None:
    """The current attachment of ``model``, if any."""
    return getattr(model, "_ranapass_attachment", None)


def detach(model: torch.nn.Module) -> None:
    """Remove the plan attached to ``model`` (no-op if none)."""
    current = attachment_of(model)
    if current is not None:
        current.detach()


@contextlib.contextmanager
def temporarily_attached(model: torch.nn.Module, plan: Plan) -> Iterator[Attachment]:
    """Run ``model`` eagerly with ``plan`` inside the context, then restore its previous attachment."""
    previous = attachment_of(model)
    attachment = attach(model, plan, check_fingerprint=False)
    try:
        with attachment.eager():
            yield attachment
    finally:
        detach(model)
        if previous is not None:
            attach(model, previous.plan, check_fingerprint=False)


def _register(module: torch.nn.Module, ref: AdapterRef) -> None:
    if is_offloaded(module):
        _OFFLOADED[module] = ref
    else:
        _REGISTRY[module.weight] = ref


def _unregister(module: torch.nn.Module, ref: AdapterRef) -> None:
    if _OFFLOADED.get(module) is ref:
        del _OFFLOADED[module]
    if _REGISTRY.get(module.weight) is ref:
        del _REGISTRY[module.weight]


# ---------------------------------------------------------------------------------------- eager path
# The attribute an eager adapter replaces: the module's forward, or under an accelerate hook the forward the
# hook wraps (``_old_forward``), so that the hook still moves the input to the layer's device. The replaced
# value is kept on the module under _SAVED and put back by ``_uninstall``.
_SAVED = "_ranapass_replaced_forward"


def _install(module: torch.nn.Module, forward) -> None:
    name = "_old_forward" if hasattr(module, "_hf_hook") and "_old_forward" in module.__dict__ else "forward"
    module.__dict__[_SAVED] = (name, module.__dict__.get(name))
    module.__dict__[name] = forward


def _uninstall(module: torch.nn.Module) -> None:
    saved = module.__dict__.pop(_SAVED, None)
    if saved is None:
        return
    name, previous = saved
    if previous is None:
        module.__dict__.pop(name, None)
    else:
        module.__dict__[name] = previous


def _adapted_forward(ref: AdapterRef, cache: list):
    """Forward of one member linear: the stacked adapter output, sliced to this member.

    Members of one unit read the same input tensor, so the stacked result is computed once per input
    (``cache`` is shared by the unit's members) and reused by the others: q, k and v cost one call.
    """
    sl = ref.adapter.member_slices()[ref.member]

    def forward(x: torch.Tensor) -> torch.Tensor:
        key = (weakref.ref(x), x._version)
        hit = cache[0] is not None and cache[0][0]() is x and cache[0][1] == x._version
        if not hit:
            y = ref.adapter(x)
            meter = FlopMeter.active
            if meter is not None:
                meter.record(ref.unit, ref.adapter.kept(x))
            cache[0], cache[1] = key, y
        return cache[1][..., sl]

    return forward


class FlopMeter:
    """Counts kept ranks/inputs per unit while adapters run eagerly, giving *measured* FLOPs.

    Example::

        with attachment.eager(), FlopMeter() as meter:
            model(ids)
        print(meter.ratio(plan))
    """

    active: FlopMeter | None = None

    def __init__(self):
        self.tokens: dict[str, int] = {}
        self.kept: dict[str, float] = {}
        self._units: dict[str, UnitPlan] = {}

    def __enter__(self) -> FlopMeter:
        if FlopMeter.active is not None:
            raise RuntimeError("a FlopMeter is already active")
        FlopMeter.active = self
        return self

    def __exit__(self, *exc) -> None:
        FlopMeter.active = None

    def record(self, unit: UnitPlan, kept: torch.Tensor) -> None:
        self._units[unit.name] = unit
        self.tokens[unit.name] = self.tokens.get(unit.name, 0) + kept.numel()
        self.kept[unit.name] = self.kept.get(unit.name, 0.0) + float(kept.sum())

    def mean_kept(self, name: str) -> float:
        return self.kept[name] / self.tokens[name]

    def flops(self, plan: Plan) -> float:
        """Measured FLOPs per token over the plan's block linears (dense units at their dense cost)."""
        total = 0.0
        for u in plan.units:
            if u.adapter is None:
                total += u.dense_flops
            elif u.name in self.tokens:
                total += u.flops(self.mean_kept(u.name))
            else:
                raise RuntimeError(f"unit {u.name!r} never ran while the meter was active: was the model run "
                                   "inside attachment.eager()?")
        return total

    def ratio(self, plan: Plan) -> float:
        """Measured FLOPs over dense FLOPs of the block linears."""
        return self.flops(plan) / plan.dense_flops()
