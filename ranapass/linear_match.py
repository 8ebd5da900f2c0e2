"""Recognise a linear by what it computes: ``y = x W^T (+ b)`` of an activation by a weight, whatever the
module class or the weight's layout.

In the torch-IR graph Dynamo hands a backend (reference/compile.md §1.3) a linear is one of:

- ``torch._C._nn.linear(x, w, b)`` (``F.linear``; ``nn.Linear`` with nn-module inlining on), weight (out, in);
- ``call_module`` on an ``nn.Linear`` (nn-module inlining off), weight (out, in);
- ``torch.addmm(b, x.view(-1, n), w).view(..., m)`` (transformers' ``Conv1D``: GPT-2 and its kin), weight
  (in, out), the activation flattened to 2D and the result viewed back;
- ``x @ w.T`` / ``torch.matmul(x, w.t())`` / ``x.matmul(w.transpose(0, 1))`` (Falcon's linear), weight
  (out, in), or ``x @ w`` with a weight (in, out), each possibly followed by ``+ b``.

A *weight* is a real 2D tensor the graph reads as an input (placeholder ``i`` is ``example_inputs[i]``) or an
attribute (``get_attr``): an ``nn.Parameter``, or any tensor ``is_weight`` accepts. A matmul of two
activations (attention scores), a 3D expert weight or a weight used otherwise (an embedding) is no match.

For calibration, ``linear_modules(model)`` names the modules whose ``forward`` is a linear of their weight
(``nn.Linear`` and subclasses, ``Conv1D``) with the weight's layout, and ``as_out_in`` gives the (out, in) view
the adapter math works in.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true, sym_eq

__all__ = ["LinearMatch", "LinearModule", "match_linears", "linear_module", "linear_modules", "as_out_in", "transposed",
           "value", "OUT_IN", "IN_OUT", "VALUE_KEYS"]

OUT_IN = "out_in"
"""Weight stored (out, in), as ``nn.Linear`` stores it: ``y = x @ w.T``."""
IN_OUT = "in_out"
"""Weight stored (in, out), as ``Conv1D`` stores it: ``y = x @ w``."""

LINEAR_TARGETS = (torch._C._nn.linear,)  # F.linear is torch._C._nn.linear
MATMUL_TARGETS = (operator.matmul, torch.matmul, torch.mm)
MATMUL_METHODS = ("matmul", "mm", "__matmul__")
ADDMM_TARGETS = (torch.addmm,)
ADD_TARGETS = (operator.add, operator.iadd, torch.add)
VIEW_TARGETS = (torch.reshape,)
VIEW_METHODS = ("view", "reshape")
VALUE_KEYS = ("example_value", "val")  # Dynamo graphs carry example_value, AOT graphs val


@dataclasses.dataclass
class LinearMatch:
    """One linear of a graph: ``output = input @ W^T + bias`` with ``W`` the weight in (out, in) layout.

    Args:
        output: the node whose value is the linear's result, in the activation's shape; its users are the
            ones to rewire to a replacement.
        nodes: the nodes computing ``output`` that a replacement makes dead when only the pattern uses them,
            each after the nodes it reads (a flattening view, a transpose of the weight, the
            linear/addmm/matmul, a bias add, a view back); ``output`` is the last one.
        input: the activation, in its own shape (before any flattening view).
        weight: the real weight tensor as stored (None when the graph computes it, e.g. an expert slice).
        weight_node: the node reading the weight (placeholder or get_attr; None for ``call_module``).
        bias: the real bias tensor, or None.
        bias_node: the node reading the bias, or None.
        bias_resolved: False when a bias is computed in the graph rather than read as a tensor.
        layout: ``OUT_IN`` or ``IN_OUT``: how ``weight`` is stored.
        op: what computes it: "linear", "addmm", "matmul" or "call_module:<class>" ("call_module:nn.Linear").
    """

    output: fx.Node
    nodes: tuple[fx.Node, ...]
    input: fx.Node
    weight: torch.Tensor | None
    weight_node: fx.Node | None
    bias: torch.Tensor | None
    bias_node: fx.Node | None
    bias_resolved: bool
    layout: str
    op: str

    @property
    def in_features(self) -> int | None:
        """The weight's input width (None when the weight is not resolved)."""
        if self.weight is None:
            return None
        return self.weight.shape[1] if self.layout == OUT_IN else self.weight.shape[0]

    @property
    def out_features(self) -> int | None:
        """The weight's output width (None when the weight is not resolved)."""
        if self.weight is None:
            return None
        return self.weight.shape[0] if self.layout == OUT_IN else self.weight.shape[1]

    def erase_unused(self, graph: fx.Graph) -> None:
        """Erase the pattern's nodes that nothing uses any more (after ``output`` was replaced), last first."""
        for node in reversed(self.nodes):
            if not node.users and node.graph is graph:
                graph.erase_node(node)


# ---------------------------------------------------------------------------------------- resolving
def value(node: Any) -> Any:
    """The fake value Dynamo (``example_value``) or AOT (``val``) recorded for a node."""
    if not isinstance(node, fx.Node):
        return None
    for key in VALUE_KEYS:
        if key in node.meta:
            return node.meta[key]
    return None


class _Resolver:
    """Real tensors of a graph's placeholders and attributes, and which of them are weights."""

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[Any],
                 is_weight: Callable[[torch.Tensor], bool] | None):
        self.gm = gm
        self.real_of = dict(zip(gm.graph.find_nodes(op="placeholder"), example_inputs))
        self.is_weight = is_weight

    def tensor(self, node: Any) -> torch.Tensor | None:
        """The real tensor a placeholder or get_attr node reads, else None."""
        if not isinstance(node, fx.Node):
            return None
        if node.op == "placeholder":
            t = self.real_of.get(node)
        elif node.op == "get_attr":
            t = operator.attrgetter(node.target)(self.gm)
        else:
            return None
        return t if isinstance(t, torch.Tensor) else None

    def weight(self, node: Any) -> torch.Tensor | None:
        """The real tensor of ``node`` if it is a weight: 2D, and a Parameter or accepted by ``is_weight``."""
        t = self.tensor(node)
        if t is None or t.dim() != 2:
            return None
        if isinstance(t, torch.nn.Parameter) or (self.is_weight is not None and self.is_weight(t)):
            return t
        return None


def _is_call(node: Any, functions: tuple, methods: tuple = ()) -> bool:
    if not isinstance(node, fx.Node):
        return False
    return (node.op == "call_function" and node.target in functions) or \
        (node.op == "call_method" and node.target in methods)


def _arg(node: fx.Node, i: int, name: str) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name)


def transposed(node: Any) -> fx.Node | None:
    """If ``node`` swaps the two dims of a 2D tensor (``.t()``, ``.T``, ``.mT``, ``transpose(0, 1)``,
    ``permute(1, 0)``), the node it transposes, else None."""
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
        return None
    target, args = node.target, node.args
    if not args or not isinstance(args[0], fx.Node):
        return None
    inner = value(args[0])
    if isinstance(inner, torch.Tensor) and inner.dim() != 2:
        return None
    if node.op == "call_function" and target is getattr and args[1:] in (("T",), ("mT",)):
        return args[0]
    name = target if node.op == "call_method" else getattr(target, "__name__", None)
    if node.op == "call_function" and target not in (torch.t, torch.transpose, torch.permute):
        return None
    if name == "t" and len(args) == 1 and not node.kwargs:
        return args[0]
    if name == "transpose" and len(args) == 3 and not node.kwargs and all(type(a) is int for a in args[1:]) \
            and {a % 2 for a in args[1:]} == {0, 1}:
        return args[0]
    if name == "permute" and not node.kwargs:
        dims = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
        if len(dims) == 2 and all(type(d) is int for d in dims) and [d % 2 for d in dims] == [1, 0]:
            return args[0]
    return None


def _weight_operand(res: _Resolver, node: Any, stored_as: str) -> tuple[fx.Node, torch.Tensor, str, list] | None:
    """``node`` is an operand used as a weight in ``stored_as`` layout: strip transposes down to a real weight.

    Returns (weight node, weight tensor, layout it is stored in, transpose nodes) or None.
    """
    layout, chain = stored_as, []
    while True:
        t = res.weight(node)
        if t is not None:
            return node, t, layout, chain
        inner = transposed(node)
        if inner is None:
            return None
        chain.append(node)
        node, layout = inner, IN_OUT if layout == OUT_IN else OUT_IN


def _same_shape(a: Any, b: Any) -> bool:
    """Shapes provably equal, without adding a guard on symbolic sizes."""
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() == b.dim()
            and all(statically_known_true(sym_eq(x, y)) for x, y in zip(a.shape, b.shape)))


def _ends_in(value: Any, width: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() >= 1 and statically_known_true(sym_eq(value.shape[-1],
                                                                                                  width))


def _bias_add(res: _Resolver, node: fx.Node, out: int) -> tuple[fx.Node, fx.Node, torch.Tensor] | None:
    """If the only use of ``node`` is ``node + b`` with ``b`` a real 1D tensor of width ``out``: (add, b node, b)."""
    if len(node.users) != 1:
        return None
    add = next(iter(node.users))
    if not _is_call(add, ADD_TARGETS, ("add", "__add__")) or len(add.args) != 2 or add.kwargs:
        return None
    other = add.args[1] if add.args[0] is node else add.args[0]
    t = res.tensor(other)
    if t is None or t.dim() != 1 or t.shape[0] != out or not _same_shape(value(add), value(node)):
        return None
    return add, other, t


# ---------------------------------------------------------------------------------------- the patterns
def _match_linear(res: _Resolver, node: fx.Node) -> LinearMatch | None:
    x, w_arg, b_arg = _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias")
    if not isinstance(x, fx.Node):
        return None
    found = _weight_operand(res, w_arg, OUT_IN)
    w_node, weight, layout, chain = found if found is not None else (w_arg, res.tensor(w_arg), OUT_IN, [])
    if weight is not None and weight.dim() != 2:
        weight = None
    bias = res.tensor(b_arg)
    return LinearMatch(node, (*chain, node), x, weight, w_node if isinstance(w_node, fx.Node) else None, bias,
                       b_arg if isinstance(b_arg, fx.Node) else None, b_arg is None or bias is not None, layout,
                       "linear")


def _match_module(res: _Resolver, node: fx.Node) -> LinearMatch | None:
    module = res.gm.get_submodule(node.target)  # torch 2.11 with inline_inbuilt_nn_modules=False
    x, lm = _arg(node, 0, "input"), linear_module(module)
    if lm is None or not isinstance(x, fx.Node):
        return None
    op = "call_module:nn.Linear" if lm.layout == OUT_IN else f"call_module:{type(module).__name__}"
    return LinearMatch(node, (node,), x, module.weight, None, module.bias, None, True, lm.layout, op)


def _flattened(node: Any) -> fx.Node | None:
    """If ``node`` views an activation ``x`` of shape (..., n) as (-1, n): ``x``, else None."""
    if not _is_call(node, VIEW_TARGETS, VIEW_METHODS) or not isinstance(node.args[0], fx.Node):
        return None
    x, flat = value(node.args[0]), value(node)
    if not isinstance(x, torch.Tensor) or not isinstance(flat, torch.Tensor) or flat.dim() != 2 or x.dim() < 2:
        return None
    return node.args[0] if _ends_in(x, flat.shape[-1]) else None


def _unflattened(node: fx.Node, x: fx.Node, out: int) -> fx.Node | None:
    """If the only use of ``node`` views it back to ``x``'s leading dims + (out,): that view, else None."""
    if len(node.users) != 1:
        return None
    view = next(iter(node.users))
    if not _is_call(view, VIEW_TARGETS, VIEW_METHODS) or view.args[0] is not node:
        return None
    xv, yv = value(x), value(view)
    if not isinstance(xv, torch.Tensor) or not isinstance(yv, torch.Tensor) or yv.dim() != xv.dim():
        return None
    same = all(statically_known_true(sym_eq(a, b)) for a, b in zip(xv.shape[:-1], yv.shape[:-1]))
    return view if same and _ends_in(yv, out) else None


def _match_addmm(res: _Resolver, node: fx.Node) -> LinearMatch | None:
    if any(node.kwargs.get(k, 1) != 1 for k in ("alpha", "beta")) or len(node.args) != 3:
        return None
    b_arg, x2d, w_arg = node.args
    found = _weight_operand(res, w_arg, IN_OUT)
    if found is None or not isinstance(x2d, fx.Node) or res.weight(x2d) is not None:
        return None
    w_node, weight, layout, chain = found
    out = weight.shape[0] if layout == OUT_IN else weight.shape[1]
    bias = res.tensor(b_arg)
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != out):
        return None  # a 2D addend: not a bias
    x, nodes = x2d, [*chain, node]
    flat_of = _flattened(x2d)
    if flat_of is not None:
        back = _unflattened(node, flat_of, out)
        if back is not None:
            x, nodes = flat_of, [x2d, *chain, node, back]
    return LinearMatch(nodes[-1], tuple(nodes), x, weight, w_node, bias,
                       b_arg if isinstance(b_arg, fx.Node) else None, b_arg is None or bias is not None, layout,
                       "addmm")


def _match_matmul(res: _Resolver, node: fx.Node) -> LinearMatch | None:
    if len(node.args) != 2 or node.kwargs:
        return None
    x, w_arg = node.args
    found = _weight_operand(res, w_arg, IN_OUT)
    if found is None or not isinstance(x, fx.Node) or res.weight(x) is not None:
        return None
    w_node, weight, layout, chain = found
    n, out = (weight.shape[1], weight.shape[0]) if layout == OUT_IN else weight.shape
    if not _ends_in(value(x), n):
        return None
    nodes, bias, b_node = [*chain, node], None, None
    added = _bias_add(res, node, out)
    if added is not None:
        add, b_node, bias = added
        nodes.append(add)
    return LinearMatch(nodes[-1], tuple(nodes), x, weight, w_node, bias, b_node, True, layout, "matmul")


def match_linears(gm: fx.GraphModule, example_inputs: Sequence[Any], *,
                  is_weight: Callable[[torch.Tensor], bool] | None = None) -> list[LinearMatch]:
    """Every linear of an activation by a weight in ``gm``, in graph order.

    Args:
        gm: a torch-IR GraphModule, as Dynamo hands it to a backend.
        example_inputs: the backend's example inputs; placeholder ``i`` reads ``example_inputs[i]``.
        is_weight: accepts tensors that are weights without being ``nn.Parameter`` (e.g. registered in
            ranapass's attach registry); parameters always are.

    Returns:
        One ``LinearMatch`` per linear. ``F.linear`` and ``nn.Linear`` calls always match (their weight may be
        unresolved: None); ``addmm`` and matmuls match only with a resolved 2D weight.

    Example::

        def backend(gm, example_inputs):
            for m in match_linears(gm, example_inputs):
                print(m.output.name, m.op, m.layout, tuple(m.weight.shape))
            return gm.forward
    """
    res = _Resolver(gm, example_inputs, is_weight)
    matches = []
    for node in gm.graph.nodes:
        match = None
        if node.op == "call_function" and node.target in LINEAR_TARGETS:
            match = _match_linear(res, node)
        elif node.op == "call_module":
            match = _match_module(res, node)
        elif _is_call(node, ADDMM_TARGETS, ("addmm",)):
            match = _match_addmm(res, node)
        elif _is_call(node, MATMUL_TARGETS, MATMUL_METHODS):
            match = _match_matmul(res, node)
        if match is not None:
            matches.append(match)
    return matches


# ---------------------------------------------------------------------------------------- modules
@dataclasses.dataclass(frozen=True)
class LinearModule:
    """A module whose forward is a linear of its ``weight``: its layout and widths."""

    module: torch.nn.Module
    layout: str
    in_features: int
    out_features: int

    @property
    def weight(self) -> torch.Tensor:
        """The module's weight as an (out, in) matrix, the layout the adapter math works in (a view)."""
        return as_out_in(self.module.weight, self.layout)


def _conv1d_class() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def linear_module(module: torch.nn.Module) -> LinearModule | None:
    """``module`` as a ``LinearModule`` if its forward is a linear of its 2D weight (``nn.Linear`` and its
    subclasses such as Falcon's, transformers' ``Conv1D``), else None."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    if isinstance(module, torch.nn.Linear):
        return LinearModule(module, OUT_IN, weight.shape[1], weight.shape[0])
    conv1d = _conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        return LinearModule(module, IN_OUT, weight.shape[0], weight.shape[1])
    return None


def linear_modules(model: torch.nn.Module) -> dict[str, LinearModule]:
    """Every module of ``model`` whose forward is a linear of its weight, by module path, in module order."""
    found = {}
    for name, module in model.named_modules():
        lm = linear_module(module)
        if lm is not None:
            found[name] = lm
    return found


def as_out_in(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """The weight as an (out, in) matrix (a view; no copy), whatever its stored layout."""
    if layout == OUT_IN:
        return weight
    if layout == IN_OUT:
        return weight.t()
    raise ValueError(f"layout must be {OUT_IN!r} or {IN_OUT!r}, got {layout!r}")
