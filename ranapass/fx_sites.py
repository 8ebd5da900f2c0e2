"""The linears of a Dynamo graph, with their operands resolved to the real tensors (the FX pass's input).

Every linear the graph computes (``ranapass.linear_match``: ``F.linear``, ``call_module`` on an
``nn.Linear``, ``Conv1D``'s ``addmm`` with its views, a matmul by a weight or its transpose, with or without
a bias) becomes a ``LinearSite``: the match (the node whose value is the linear's result, the nodes a
replacement makes dead, the input node, the real weight, its layout and the bias) and the adapter registered
for the weight, looked up by identity, never by name.

A registered weight is rewritten only where the plan covers every use of it in the graph: every read of
its node is a linear of the module the plan adapts (its own calls, which is what the eager path adapts).
A weight also read by another op (an embedding tied to it) or by another module's linear stays dense at
every use, with the reason (``shared_use``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from ranapass.attach import AdapterRef, lookup
from ranapass.cost_model import flops
from ranapass.linear_match import VALUE_KEYS, LinearMatch, as_out_in, match_linears, transposed, value
from ranapass.rewrite_report import LeftDense

__all__ = ["VALUE_KEYS", "LinearSite", "find_linears", "module_path", "shared_uses", "unfound", "value"]

OLD_OPS = {"linear": "torch._C._nn.linear", "addmm": "torch.addmm", "matmul": "torch.matmul"}
"""How a report names what the replaced nodes computed, by ``LinearMatch.op``."""


@dataclasses.dataclass
class LinearSite:
    """A linear of the graph with its operands resolved to real tensors, and the adapter of its weight."""

    match: LinearMatch
    ref: AdapterRef | None

    @property
    def node(self) -> fx.Node:
        """The node whose value is the linear's result (the one a replacement takes the place of)."""
        return self.match.output

    @property
    def input(self) -> fx.Node:
        return self.match.input

    @property
    def weight(self) -> torch.Tensor | None:
        """The weight as stored (its layout is ``match.layout``)."""
        return self.match.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.match.bias

    @property
    def bias_resolved(self) -> bool:
        """False when the bias is computed in the graph, not a parameter."""
        return self.match.bias_resolved

    @property
    def old_op(self) -> str:
        return OLD_OPS.get(self.match.op, self.match.op)

    @property
    def path(self) -> str:
        return self.ref.path if self.ref is not None else module_path(self.node)

    def left_dense(self, reason: str) -> LeftDense:
        cost = 0.0
        if self.weight is not None:
            out, n = as_out_in(self.weight, self.match.layout).shape
            cost = flops.per_token(flops.dense_linear(out, n))
        return LeftDense(self.node.name, self.path, reason, cost)


def module_path(node: fx.Node) -> str:
    """The module path of a node, from ``nn_module_stack``, without Dynamo's frame prefix (for reports only)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return node.name
    path = list(stack.values())[-1][0]
    path = re.sub(r"^L\[[^\]]*\](\[[^\]]*\])*\.?", "", path)  # L['self'].x / L['args'][0].x -> x
    return re.sub(r"\[(\d+)\]", r".\1", path) or node.name


def find_linears(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> list[LinearSite]:
    """Every linear of ``gm`` with its real weight and bias, and the adapter registered for the weight."""
    registered = lambda t: lookup(t) is not None  # noqa: E731
    return [LinearSite(m, lookup(m.weight) if m.weight is not None else None)
            for m in match_linears(gm, example_inputs, is_weight=registered)]


def shared_uses(sites: list[LinearSite]) -> dict[int, str]:
    """Registered weights (by ``id``) read by something the plan does not cover, each with the first such read.

    A read is covered when it is one of the linears matched on the weight, computed inside the module the plan
    adapts (in a graph that records modules, ``nn_module_stack``; a graph without that metadata is taken at
    its word; a linear compiled on its own, whose calls are top-level nodes, counts as another module's).
    Transposes of the weight are followed to their users.
    """
    by_weight: dict[int, list[LinearSite]] = {}
    for s in sites:
        if s.ref is not None:
            by_weight.setdefault(id(s.weight), []).append(s)
    out = {}
    for key, group in by_weight.items():
        graph = group[0].node.graph
        records_modules = any(n.meta.get("nn_module_stack") for n in graph.nodes)
        path = group[0].ref.path
        foreign = next((s for s in group if records_modules and not _inside(_owner(s.node), path)), None)
        if foreign is not None:
            out[key] = f"a linear of {_owner(foreign.node) or 'the top-level module'} ({foreign.node.name})"
            continue
        covered = {n for s in group for n in s.match.nodes}
        user = _uncovered_read([s.match.weight_node for s in group if s.match.weight_node is not None], covered)
        if user is not None:
            out[key] = f"{user.name} ({user.op} {getattr(user.target, '__name__', user.target)})"
    return out


def _inside(owner: str, path: str) -> bool:
    """Whether a node computed in module ``owner`` (relative to the compiled root) is in module ``path`` (relative
    to the model): the paths end alike (the compiled root may be a submodule of the model)."""
    return bool(owner) and (path == owner or path.endswith("." + owner))


def _owner(node: fx.Node) -> str:
    """The path of the module computing ``node`` ("" at the top level)."""
    return module_path(node) if node.meta.get("nn_module_stack") else ""


def _uncovered_read(nodes: list[fx.Node], covered: set[fx.Node]) -> fx.Node | None:
    """The first user of ``nodes`` (or of a transpose of them) that is not in ``covered``, else None."""
    while nodes:
        node = nodes.pop()
        for user in node.users:
            if user not in covered:
                return user
            if transposed(user) is node:
                nodes.append(user)
    return None


def unfound(gm: fx.GraphModule, example_inputs: Sequence[Any], sites: list[LinearSite]) -> list[str]:
    """Member paths of registered weights the graph reads (as inputs or attributes) outside any linear node."""
    seen = {id(s.weight) for s in sites}
    candidates = [*example_inputs, *gm.parameters()]
    out = []
    for t in candidates:
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            ref = lookup(t)
            if ref is not None:
                out.append(ref.path)
                seen.add(id(t))
    return out
