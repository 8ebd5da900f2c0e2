"""The linear nodes of a Dynamo graph, with their operands resolved to the real tensors (the FX pass's input).

Every linear node (``F.linear`` / ``torch._C._nn.linear`` calls, ``call_module`` on an ``nn.Linear``)
becomes a ``LinearSite``: its input node, and its weight and bias as the *real* tensors (placeholder
``i`` is ``example_inputs[i]``; ``get_attr`` and module attributes are read off the GraphModule). The
weight is looked up in the attach registry by identity, never by name.
"""

from __future__ import annotations

import dataclasses
import operator
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from ranapass.attach import AdapterRef, lookup
from ranapass.cost_model import flops
from ranapass.rewrite_report import LeftDense

__all__ = ["LINEAR_TARGETS", "VALUE_KEYS", "LinearSite", "find_linears", "module_path", "unfound", "value"]

LINEAR_TARGETS = (torch._C._nn.linear,)  # F.linear is torch._C._nn.linear
VALUE_KEYS = ("example_value", "val")  # Dynamo graphs carry example_value, AOT graphs val


@dataclasses.dataclass
class LinearSite:
    """A linear node with its operands resolved to real tensors."""

    node: fx.Node
    input: fx.Node
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    bias_resolved: bool  # False when the bias is computed in the graph, not a parameter
    old_op: str
    ref: AdapterRef | None

    @property
    def path(self) -> str:
        return self.ref.path if self.ref is not None else module_path(self.node)

    def left_dense(self, reason: str) -> LeftDense:
        cost = 0.0
        if isinstance(self.weight, torch.Tensor) and self.weight.dim() == 2:
            cost = flops.per_token(flops.dense_linear(*self.weight.shape))
        return LeftDense(self.node.name, self.path, reason, cost)


def module_path(node: fx.Node) -> str:
    """The module path of a node, from ``nn_module_stack``, without Dynamo's frame prefix (for reports only)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return node.name
    path = list(stack.values())[-1][0]
    path = re.sub(r"^L\[[^\]]*\](\[[^\]]*\])*\.?", "", path)  # L['self'].x / L['args'][0].x -> x
    return re.sub(r"\[(\d+)\]", r".\1", path) or node.name


def value(node: Any) -> Any:
    """The fake value Dynamo (``example_value``) or AOT (``val``) recorded for a node."""
    if not isinstance(node, fx.Node):
        return None
    for key in VALUE_KEYS:
        if key in node.meta:
            return node.meta[key]
    return None


def _real_tensor(gm: fx.GraphModule, node: Any, real_of: dict[fx.Node, Any]) -> tuple[bool, torch.Tensor | None]:
    """Resolve a weight/bias argument to the real tensor: ``(resolved, tensor)``; None resolves to None."""
    if node is None:
        return True, None
    if not isinstance(node, fx.Node):
        return False, None
    if node.op == "placeholder":
        t = real_of.get(node)
        return isinstance(t, torch.Tensor), t if isinstance(t, torch.Tensor) else None
    if node.op == "get_attr":
        t = operator.attrgetter(node.target)(gm)
        return isinstance(t, torch.Tensor), t if isinstance(t, torch.Tensor) else None
    return False, None


def find_linears(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> list[LinearSite]:
    """Every linear node of ``gm`` with its real weight and bias, and the adapter registered for the weight."""
    real_of = dict(zip(gm.graph.find_nodes(op="placeholder"), example_inputs))
    sites = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in LINEAR_TARGETS:
            x = node.args[0] if node.args else node.kwargs.get("input")
            w_arg = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            b_arg = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            _, weight = _real_tensor(gm, w_arg, real_of)
            bias_resolved, bias = _real_tensor(gm, b_arg, real_of)
            old_op = "torch._C._nn.linear"
        elif node.op == "call_module" and isinstance(gm.get_submodule(node.target), torch.nn.Linear):
            module = gm.get_submodule(node.target)  # torch 2.11 with inline_inbuilt_nn_modules=False
            x = node.args[0] if node.args else node.kwargs.get("input")
            weight, bias, bias_resolved = module.weight, module.bias, True
            old_op = "call_module:nn.Linear"
        else:
            continue
        if not isinstance(x, fx.Node):
            continue
        ref = lookup(weight) if isinstance(weight, torch.Tensor) else None
        sites.append(LinearSite(node, x, weight, bias, bias_resolved, old_op, ref))
    return sites


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
