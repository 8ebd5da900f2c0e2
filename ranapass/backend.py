"""The torch.compile backend: rewrite the attached linears, then hand the graph to Inductor.

``torch.compile(model, backend=ranapass.rana_backend)`` (or ``backend="rana"``, through the
``torch_dynamo_backends`` entry point) runs the FX pass of ``ranapass.fx_pass`` on every graph Dynamo
captures and compiles the result with Inductor, passing on the user's ``mode`` and ``options``.
Options for ranapass itself live on a ``RanaBackend`` instance, or in ``options`` under keys
prefixed ``ranapass.`` (e.g. ``options={"ranapass.strict": True}``), which never reach Inductor.
(torch.compile accepts ``mode`` or ``options``, not both: with a mode, configure an instance.)

Every graph is guarded on the attachment state of the weights it reads (``ranapass.attach_guard``): after
``attach``, ``detach`` or for another model, Dynamo recompiles instead of reusing adapters baked for another
state, so one backend object serves any number of models and plans.

Each compiled graph's ``RewriteReport`` is kept in ``backend.reports``; ``backend.check(model)``
raises unless every adapted unit of the model's plan was rewritten in some compiled graph.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

from ranapass.attach import attachment_of, lookup
from ranapass.attach_guard import guard_graph
from ranapass.fx_pass import RewriteError, RewriteReport, find_linears, rewrite_linears

__all__ = ["RanaBackend", "rana_backend", "unrewritten_units"]

COMPILERS = ("inductor", "aot_eager", "eager")
OPTION_PREFIX = "ranapass."


@dataclasses.dataclass(eq=False)
class RanaBackend:
    """A configured ranapass backend; instances are callable torch.compile backends.

    Args:
        strict: raise ``RewriteError`` when a graph reads a registered weight it cannot rewrite,
            instead of leaving that linear dense with a warning.
        fuse_gated_mlp: emit ``gated_neuron_adapter`` for neuron-adapted down projections of gated MLPs.
        pair_adapters: emit one pair op for two units of a kind (rank or neuron adapters) reading one
            input (q and k, gate and up as separate units), so their kernels share launches.
        compiler: what compiles the rewritten graph: "inductor" (the product), or "aot_eager" /
            "eager" to debug the rewrite without Inductor.
        reports: one ``RewriteReport`` per graph this backend compiled, oldest first (clear at will).

    Example::

        ranapass.attach(model, plan)
        fast = torch.compile(model, backend=ranapass.RanaBackend(strict=True), mode="max-autotune")
    """

    strict: bool = False
    fuse_gated_mlp: bool = True
    pair_adapters: bool = True
    compiler: str = "inductor"
    reports: list[RewriteReport] = dataclasses.field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.compiler not in COMPILERS:
            raise ValueError(f"compiler must be one of {COMPILERS}, got {self.compiler!r}")

    @property
    def __name__(self) -> str:  # torch._dynamo names backends by their __name__
        return "rana"

    def __deepcopy__(self, memo: dict) -> RanaBackend:
        # Hugging Face's CompileConfig.to_dict() deep-copies its backend: the copy would record the
        # reports where nobody reads them. A backend is shared configuration, like a function.
        return self

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], mode: str | None = None,
                 options: dict[str, Any] | None = None) -> Callable[..., Any]:
        """Rewrite ``gm`` in place and compile it; ``mode``/``options`` are torch.compile's."""
        inductor_options = dict(options or {})
        own = {k[len(OPTION_PREFIX):]: inductor_options.pop(k) for k in list(inductor_options)
               if k.startswith(OPTION_PREFIX)}
        config = dataclasses.replace(self, **own) if own else self
        read = [site.weight for site in find_linears(gm, example_inputs)]
        read += [t for t in example_inputs if isinstance(t, torch.Tensor) and lookup(t) is not None]
        guard_graph(gm, example_inputs, read)
        report = rewrite_linears(gm, example_inputs, fuse_gated_mlp=config.fuse_gated_mlp,
                                 pair_adapters=config.pair_adapters, strict=config.strict)
        self.reports.append(report)
        return config._compile(gm, example_inputs, mode, inductor_options)

    def _compile(self, gm: fx.GraphModule, example_inputs: Sequence[Any], mode: str | None,
                 options: dict[str, Any]) -> Callable[..., Any]:
        if self.compiler == "inductor":
            from torch._inductor import list_mode_options
            from torch._inductor.compile_fx import compile_fx

            patches = {**(list_mode_options(mode) if mode else {}), **options}
            return compile_fx(gm, example_inputs, config_patches=patches or None)
        if mode or options:
            raise ValueError(f"mode/options configure Inductor; compiler={self.compiler!r} takes none")
        if self.compiler == "aot_eager":
            from torch._dynamo.backends.registry import lookup_backend

            return lookup_backend("aot_eager")(gm, example_inputs)
        return gm.forward

    def unrewritten(self, model: torch.nn.Module) -> list[str]:
        """Units of ``model``'s attached plan that no graph compiled by this backend rewrote."""
        return unrewritten_units(model, self.reports)

    def check(self, model: torch.nn.Module) -> None:
        """Raise ``RewriteError`` unless every adapted unit of ``model`` was rewritten by this backend."""
        missing = self.unrewritten(model)
        if missing:
            raise RewriteError(f"{len(missing)} attached unit(s) of the model were never rewritten in a compiled "
                               f"graph: {', '.join(missing)}. See the per-graph reports in backend.reports.")


rana_backend = RanaBackend()
"""The default backend: ``torch.compile(model, backend=ranapass.rana_backend)``."""


def unrewritten_units(model: torch.nn.Module, reports: Sequence[RewriteReport]) -> list[str]:
    """Names of the adapted units of ``model``'s attachment that none of ``reports`` rewrote.

    Raises ``ValueError`` when ``model`` has no attached plan.
    """
    attachment = attachment_of(model)
    if attachment is None:
        raise ValueError("the model has no attached plan: call ranapass.attach(model, plan) first")
    return [unit.name for unit in attachment.plan.adapted
            if not any(r.rewrote(unit) for report in reports for r in report.rewrites)]
