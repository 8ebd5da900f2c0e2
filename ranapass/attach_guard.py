"""Make Dynamo's guards cover a model's attachment, so that a compiled handle never runs stale adapters.

The FX pass bakes into each graph the adapters registered for the weights it reads (``attach.lookup``).
Dynamo does not see that registry, so by itself it would reuse the graph after ``attach``/``detach``, for
another model of the same class, or for another layer: a graph break at a module boundary (accelerate's
hooks make one around every hooked module) gives one frame that Dynamo runs for every instance, with
their weights as inputs. So every module holding parameters carries a token object, ``module._ranapass_token``:

- ``attach`` and ``detach`` give each such module of the model a fresh token of its own (``renew``);
- the backend adds an ``ID_MATCH`` guard on the token of the module owning each weight its graph reads
  (``guard_graph``; a weight read as a plain input carries the token itself). A module or weight the
  backend meets without a token gets one, so a graph compiled before ``attach`` is guarded too.

The token lives on the module, not on its weight, because accelerate replaces an offloaded module's
weight tensor at every forward. A changed attachment, another model or another layer fails the guard and
Dynamo recompiles with the current adapters.
Cache entries whose token is gone would still count toward ``torch._dynamo.config.recompile_limit``,
past which Dynamo runs the frame eagerly (dense weights, not the adapters); so ``renew`` also drops the
cached code of every frame guarded by a token it replaces.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import fx

__all__ = ["renew", "guard_graph"]

TOKEN = "_ranapass_token"


class _Token:
    """One attachment state of some weights; compared by identity, weakly referenced by Dynamo's guards."""

    __slots__ = ("__weakref__",)


# token -> code objects of the frames whose compiled graphs are guarded by it
_FRAMES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def renew(model: torch.nn.Module) -> None:
    """Give every module of ``model`` that holds parameters a new token (call after its registry entries changed)."""
    old = []
    for module in model.modules():
        if module._parameters:
            previous = module.__dict__.get(TOKEN)
            if previous is not None:
                old.append(previous)
            module.__dict__[TOKEN] = _Token()
    for previous in old:
        for code in _FRAMES.pop(previous, ()):
            torch._C._dynamo.eval_frame.reset_code(code)


def _owner(source: Any) -> Any:
    """The source of the module whose ``_parameters`` a weight's source reads, else None."""
    from torch._dynamo.source import AttrSource, DictGetItemSource

    if isinstance(source, DictGetItemSource) and isinstance(source.base, AttrSource) \
            and source.base.member == "_parameters":
        return source.base.base
    return None


def _module_at(source: Any, scope: dict[str, Any]) -> torch.nn.Module | None:
    """The module a Dynamo source names in the frame being compiled (``scope``: its ``L`` and ``G``), else None."""
    if source is None:
        return None
    try:
        module = eval(source.name, scope)  # noqa: S307 (a Dynamo source expression, evaluated as its guards are)
    except Exception:  # a source expression using Dynamo's own helpers: guard on the tensor instead
        return None
    return module if isinstance(module, torch.nn.Module) else None


def guard_graph(gm: fx.GraphModule, example_inputs: Sequence[Any], tensors: Iterable[torch.Tensor]) -> int:
    """Guard the graph Dynamo is compiling on the tokens of ``tensors`` (those of its inputs it reads).

    Called by the backend while Dynamo compiles ``gm``; outside Dynamo (no cache, nothing to guard) it
    does nothing. Returns the number of guards added.
    """
    from torch._dynamo.guards import GuardBuilder, install_guard
    from torch._dynamo.source import AttrSource
    from torch._dynamo.symbolic_convert import InstructionTranslator

    try:
        tx = InstructionTranslator.current_tx()
        code = tx.f_code
    except AttributeError:  # not called by Dynamo
        return 0
    source_of = {}
    for node, value in zip(gm.graph.find_nodes(op="placeholder"), example_inputs):
        arg = node.meta.get("grapharg")
        if isinstance(value, torch.Tensor) and arg is not None and arg.source is not None:
            source_of.setdefault(id(value), arg.source)
    scope = {"L": tx.f_locals, "G": tx.f_globals}
    guarded = set()
    for t in tensors:
        source = source_of.get(id(t))
        if source is None:
            continue
        holder = t
        module = _module_at(_owner(source), scope)
        if module is not None:
            source, holder = _owner(source), module
        token = holder.__dict__.get(TOKEN)
        if token is None:
            token = holder.__dict__[TOKEN] = _Token()
        if id(token) in guarded:
            continue
        guarded.add(id(token))
        install_guard(AttrSource(source, TOKEN).make_guard(GuardBuilder.ID_MATCH))
        _FRAMES.setdefault(token, set()).add(code)
    return len(guarded)
