"""Make Dynamo's guards cover a model's attachment, so that a compiled handle never runs stale adapters.

The FX pass bakes into each graph the adapters registered for the weights it reads (``attach.lookup``).
Dynamo does not see that registry, so by itself it would reuse the graph after ``attach``/``detach``, or
for another model of the same class. So every weight carries a token object, ``weight._ranapass_token``:

- ``attach`` and ``detach`` give all parameters of the model one fresh token (``renew``);
- the backend adds an ``ID_MATCH`` guard on the token of the weights its graph reads (``guard_graph``),
  one guard per distinct token (usually one per graph). A weight the backend meets without a token gets
  its own, so a graph compiled before ``attach`` is guarded too.

A changed attachment, or another model, fails the guard and Dynamo recompiles with the current adapters.
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
    """Give every parameter of ``model`` one new token (call after its registry entries changed)."""
    token = _Token()
    old = set()
    for p in model.parameters():
        previous = p.__dict__.get(TOKEN)
        if previous is not None:
            old.add(previous)
        setattr(p, TOKEN, token)
    for previous in old:
        for code in _FRAMES.pop(previous, ()):
            torch._C._dynamo.eval_frame.reset_code(code)


def guard_graph(gm: fx.GraphModule, example_inputs: Sequence[Any], tensors: Iterable[torch.Tensor]) -> int:
    """Guard the graph Dynamo is compiling on the tokens of ``tensors`` (those of its inputs it reads).

    Called by the backend while Dynamo compiles ``gm``; outside Dynamo (no cache, nothing to guard) it
    does nothing. Returns the number of guards added.
    """
    from torch._dynamo.guards import GuardBuilder, install_guard
    from torch._dynamo.source import AttrSource
    from torch._dynamo.symbolic_convert import InstructionTranslator

    try:
        code = InstructionTranslator.current_tx().f_code
    except AttributeError:  # not called by Dynamo
        return 0
    source_of = {}
    for node, value in zip(gm.graph.find_nodes(op="placeholder"), example_inputs):
        arg = node.meta.get("grapharg")
        if isinstance(value, torch.Tensor) and arg is not None and arg.source is not None:
            source_of.setdefault(id(value), arg.source)
    guarded = set()
    for t in tensors:
        source = source_of.get(id(t))
        if source is None:
            continue
        token = t.__dict__.get(TOKEN)
        if token is None:
            token = _Token()
            setattr(t, TOKEN, token)
        if id(token) in guarded:
            continue
        guarded.add(id(token))
        install_guard(AttrSource(source, TOKEN).make_guard(GuardBuilder.ID_MATCH))
        _FRAMES.setdefault(token, set()).add(code)
    return len(guarded)
