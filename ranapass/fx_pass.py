"""The FX pass: rewrite the linears whose weights carry an attached adapter into ``torch.ops.ranapass`` ops.

It runs on the torch-IR graph Dynamo hands to the backend, before AOTAutograd (reference/compile.md
§1.3), in two phases like Inductor's passes:

1. *Decide.* Every linear the graph computes becomes a ``LinearSite`` (fx_sites.py, on
   ``ranapass.linear_match``: ``F.linear``, ``nn.Linear``, ``Conv1D``'s ``addmm``, a matmul by a weight or
   its transpose; its input node, its real weight, layout and bias, and the adapter registered for the
   weight, looked up by identity, never by name). ``_should_rewrite(site)`` accepts it or names the reason
   it must stay dense; a weight the graph also reads elsewhere stays dense at every use (``shared_use``).
2. *Rewrite.* Accepted sites are grouped by (adapter, input node). A group becomes one op node that
   computes the unit's stacked output (q, k and v from one B product and one mask) and one slice per
   member linear, which takes the place of the linear's output node (the nodes of the pattern left
   unused, a flattening view or a transpose of the weight, are erased)::

       q = linear(x, Wq); k = linear(x, Wk); v = linear(x, Wv)
       --->  qkv = ranapass.rank_adapter(x, B, At, thresholds, bias)
             q = qkv[..., :m_q]; k = qkv[..., m_q:m_q+m_k]; v = qkv[..., m_q+m_k:]

   The adapter tensors become buffers of the GraphModule, registered once per adapter with a
   ``ConstantSource`` so AOTAutograd lifts them as static inputs (compile.md §2.2). What the op node
   calls is the kind's business (``AdapterSpec.lowering``): its ``torch.ops.ranapass`` op, or for a
   kind without one its reference function, whose math AOTAutograd traces and Inductor compiles. A
   single-member unit of a kind with a gated op (neuron adapter: ``gated_neuron_adapter``) whose input
   is ``act(gate) * up`` may become one gated call, so the kernels can fuse the MLP middle.
3. *Pair.* Two ops of a kind with a pair op that read one input (two ``rank_adapter`` units, gate and
   up, each with its own B and mask; two ``neuron_adapter`` units, such as q and k or gate and up, each
   with its own thresholds) may become one pair node (``rank_adapter_pair``, ``neuron_adapter_pair``)
   and a ``getitem`` per unit, so their kernels share launches::

       g = ranapass.rank_adapter(x, Bg, Atg, tg, None); u = ranapass.rank_adapter(x, Bu, Atu, tu, None)
       --->  gu = ranapass.rank_adapter_pair(x, Bg, Atg, tg, None, Bu, Atu, tu, None); g = gu[0]; u = gu[1]

   Three ops on one input (q, k and v) make one pair and one single op, in graph order.

Nothing is silent: the ``RewriteReport`` lists the units rewritten, every registered weight left
dense with its reason, the unregistered linears and the 3D expert weights of mixture-of-experts blocks
(``ranapass.experts``), with their FLOPs; it is logged at INFO (WARNING when a
registered weight was left dense), and ``strict=True`` raises instead.
"""

from __future__ import annotations

import logging
import operator
import re
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx
from torch._dynamo.source import ConstantSource
from torch.fx.experimental.symbolic_shapes import statically_known_true, sym_eq

from ranapass.adapters import ADAPTER_KINDS
from ranapass.attach import AdapterRef
from ranapass.bound import ranapass_op
from ranapass.cost_model import flops
from ranapass.experts import graph_experts
from ranapass.fx_sites import VALUE_KEYS, LinearSite, find_linears, shared_uses, unfound, value
from ranapass.kernels.activations import call_name
from ranapass.rewrite_report import LeftDense, OpRewrite, RewriteError, RewriteReport

__all__ = ["rewrite_linears", "RewriteReport", "OpRewrite", "LeftDense", "RewriteError"]

log = logging.getLogger(__name__)

MUL_TARGETS = (operator.mul, torch.mul)
META_KEYS = ("nn_module_stack", "stack_trace", "source_fn_stack")
NOT_REGISTERED = "not_registered"


# ---------------------------------------------------------------------------------------- decide
def _should_rewrite(site: LinearSite, shared: dict[int, str]) -> tuple[bool, str]:
    """Whether a linear can become its adapter's op, reading only resolved tensors and fake values
    (``shared``: registered weights read elsewhere too, from ``shared_uses``)."""
    ref = site.ref
    if ref is None:
        return False, NOT_REGISTERED
    if id(site.weight) in shared:
        return False, (f"shared_use: the weight is also read by {shared[id(site.weight)]}, which the plan does not "
                       f"adapt; an adapter would cover one use only (untie the weight, or leave it dense)")
    adapter = ref.adapter
    like = next(t for t in adapter.buffers.values() if t is not None)
    if site.weight.dtype != like.dtype or site.weight.device != like.device:
        return False, (f"stale_adapter: the weight is {site.weight.dtype} on {site.weight.device} but the adapter "
                       f"was bound for {like.dtype} on {like.device}; attach the plan again after moving the model")
    x, out = value(site.input), value(site.node)
    if isinstance(x, torch.Tensor):
        if x.dim() == 0 or not statically_known_true(sym_eq(x.shape[-1], adapter.spec.in_features)):
            return False, f"input_shape: input {tuple(x.shape)} does not end in {adapter.spec.in_features}"
        if x.dtype != like.dtype or x.device != like.device:
            return False, f"input_dtype: input is {x.dtype} on {x.device}, the adapter {like.dtype} on {like.device}"
        if x.requires_grad:
            return False, ("requires_grad: adapters are inference-only (no backward); run the compiled model under "
                           "torch.no_grad() or torch.inference_mode()")
    if isinstance(out, torch.Tensor) and out.dtype != like.dtype:
        return False, f"autocast: the linear returns {out.dtype}, the adapter {like.dtype}"
    if not site.bias_resolved:
        return False, "bias_computed: the bias is computed in the graph, not a parameter"
    stacked = adapter.model_bias
    mine = None if stacked is None else stacked[adapter.member_slices()[ref.member]]
    if site.bias is None:
        if mine is not None and bool(mine.any()):
            return False, "bias_mismatch: the linear has no bias but the adapter adds one"
    elif mine is None or not torch.equal(site.bias.detach().to(mine.dtype), mine):
        return False, "bias_mismatch: the linear's bias differs from the one bound at attach time; attach again"
    return True, ""


def _gated_input(node: fx.Node) -> tuple[fx.Node, fx.Node, str, list[fx.Node]] | None:
    """If ``node`` is ``act(gate) * up`` with a fusable activation: (gate, up, activation, [mul, act])."""
    is_mul = (node.op == "call_function" and node.target in MUL_TARGETS) or \
        (node.op == "call_method" and node.target == "mul")
    if not is_mul or len(node.args) != 2 or node.kwargs:
        return None
    for act, up in (node.args, node.args[::-1]):
        name = _activation(act)
        if name is None or not isinstance(up, fx.Node):
            continue
        vals = [value(n) for n in (act.args[0], up, node)]
        if not all(isinstance(v, torch.Tensor) for v in vals) or not all(_same_shape(v, vals[0]) for v in vals):
            return None  # broadcasting or unknown shapes: not the plain gated MLP
        return act.args[0], up, name, [node, act]
    return None


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Shapes provably equal, without adding a guard on symbolic sizes."""
    return a.dim() == b.dim() and all(statically_known_true(sym_eq(x, y)) for x, y in zip(a.shape, b.shape))


def _activation(node: Any) -> str | None:
    """The gated-activation name of an ``F.silu``/``F.gelu`` call node (see ``kernels/activations.py``), else None."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or len(node.args) != 1:
        return None
    return call_name(node.target, node.kwargs)


# ---------------------------------------------------------------------------------------- rewrite
class _Rewriter:
    """Graph surgery for one GraphModule: buffers, op nodes, slices, meta."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.graph = gm.graph
        self.buffer_names: dict[int, dict[str, str]] = {}  # id(bound adapter) -> op arg -> buffer name
        self.fake_mode = None
        for node in self.graph.nodes:
            val = value(node)
            if isinstance(val, torch._subclasses.FakeTensor):
                self.fake_mode = val.fake_mode
                break

    def buffers(self, ref: AdapterRef) -> list[fx.Node | None]:
        """``get_attr`` nodes for the adapter's tensors (registered once per adapter), None for absent ones."""
        adapter = ref.adapter
        names = self.buffer_names.get(id(adapter))
        if names is None:
            names = {}
            stem = "rana_" + re.sub(r"\W+", "_", ref.unit.name).strip("_")
            for key, t in adapter.buffers.items():
                if t is None:
                    continue
                name, i = f"{stem}_{key}", 1
                while hasattr(self.gm, name):
                    name, i = f"{stem}_{key}_{i}", i + 1
                self.gm.register_buffer(name, t)
                if getattr(self.gm, "_param_name_to_source", None) is not None:
                    # AOTAutograd needs a source for every buffer of a Dynamo graph; it then lifts it as a
                    # static input (compile.md §2.2).
                    self.gm._param_name_to_source[name] = ConstantSource(name)
                names[key] = name
            self.buffer_names[id(adapter)] = names
        nodes = []
        for key, t in adapter.buffers.items():
            if t is None:
                nodes.append(None)
                continue
            node = self.graph.get_attr(names[key])
            self._setvalue(node, lambda t=t: self.fake_mode.from_tensor(t, static_shapes=True))
            nodes.append(node)
        return nodes

    def call(self, target: Any, args: tuple, like: fx.Node, compute) -> fx.Node:
        """A new call_function node carrying ``like``'s module meta and the fake value ``compute()``."""
        node = self.graph.call_function(target, args)
        for key in META_KEYS:
            if key in like.meta:
                node.meta[key] = like.meta[key]
        self._setvalue(node, compute, keys=[k for k in VALUE_KEYS if k in like.meta] or ["example_value"])
        return node

    def _setvalue(self, node: fx.Node, compute, keys: Sequence[str] = ("example_value",)) -> None:
        if self.fake_mode is None:
            return
        with self.fake_mode:
            value = compute()
        for key in keys:
            node.meta[key] = value

    def replace(self, old: fx.Node, new: fx.Node) -> None:
        old.replace_all_uses_with(new)
        self.graph.erase_node(old)


def _rewrite_group(rw: _Rewriter, sites: list[LinearSite], order: dict[fx.Node, int],
                   fuse_gated_mlp: bool) -> OpRewrite:
    """Replace the linears of one (adapter, input) group by one op node and a slice per member."""
    ref = sites[0].ref
    adapter, unit = ref.adapter, ref.unit
    first = min(sites, key=lambda s: order[s.node])
    sites = sorted(sites, key=lambda s: (s.ref.member, order[s.node]))
    slices = adapter.member_slices()
    x = first.input
    lowering = adapter.spec.lowering
    gated = None
    if fuse_gated_mlp and lowering is not None and lowering.gated_op is not None and len(slices) == 1:
        gated = _gated_input(x)

    with rw.graph.inserting_before(first.node):
        buffers = rw.buffers(ref)
        if gated is not None:
            gate, up, activation, _ = gated
            target = ranapass_op(lowering.gated_op)
            args = (gate, up, *buffers, *adapter.constants, activation)
        else:  # the kind's op, or (a kind without one) its reference math, traced by AOTAutograd
            target, args = adapter.op, (x, *buffers, *adapter.constants)
        op_node = rw.call(target, args, first.node,
                          lambda: target(*(value(a) if isinstance(a, fx.Node) else a for a in args)))
        stands_for: dict[fx.Node, fx.Node] = {}
        for s in sites:
            if len(slices) == 1:
                stands_for[s.node] = op_node
            else:
                sl = slices[s.ref.member]
                stands_for[s.node] = rw.call(operator.getitem, (op_node, (Ellipsis, sl)), s.node,
                                             lambda sl=sl: value(op_node)[..., sl])
    outputs = {old.name: new.name for old, new in stands_for.items()}
    for s in sites:
        s.node.replace_all_uses_with(stands_for[s.node])
        s.match.erase_unused(rw.graph)
    if gated is not None:
        for dead in gated[3]:  # the mul and the activation, now computed inside the fused op
            if not dead.users:
                rw.graph.erase_node(dead)
    present = sorted({s.ref.member for s in sites})
    return OpRewrite(
        node=op_node.name,
        unit=unit.name,
        op=_op_name(target),
        old_op=first.old_op,
        replaced=tuple(outputs),
        members=tuple(unit.members[m] for m in present),
        outputs=outputs,
        partial=len(present) != len(slices),
        width=adapter.spec.width,
        expected_kept=unit.expected_kept,
        flops_before=sum(flops.per_token(flops.dense_linear(unit.out_features[m], unit.in_features))
                         for m in present),
        flops_after=unit.flops(),
        _unit=weakref.ref(unit),
    )


def _op_name(target: Any) -> str:
    """``ranapass.<op>`` for a ranapass op, the qualified name of a traced reference function otherwise."""
    if isinstance(target, torch._ops.OpOverload):
        return f"ranapass.{target._schema.name.split('::')[-1]}"
    return f"{target.__module__}.{target.__qualname__}"


def _pair_ops() -> dict[torch._ops.OpOverload, torch._ops.OpOverload]:
    """Each kind's op -> the op that runs two of its calls on one input, for the kinds that offer one."""
    return {ranapass_op(k.lowering.op): ranapass_op(k.lowering.pair_op) for k in ADAPTER_KINDS.values()
            if k.lowering is not None and k.lowering.pair_op is not None}


def _pair_adapters(rw: _Rewriter, rewrites: list[OpRewrite]) -> int:
    """Fuse the ops of a kind with a pair op (rank and neuron adapters) that read one input, two by two.

    The pair node goes where the first op was; the second op's buffer nodes move before it. Both ops
    need the same operands present (a bias or neither: the kernels take one flag). Returns the number
    of pairs made.
    """
    pair_of = _pair_ops()
    groups: dict[tuple, list[fx.Node]] = {}
    for node in rw.graph.nodes:
        if node.op == "call_function" and node.target in pair_of:
            present = tuple(a is not None for a in node.args[1:])
            groups.setdefault((node.target, node.args[0], present), []).append(node)
    by_node = {r.node: r for r in rewrites}
    pairs = 0
    for (single, _, _), group in groups.items():
        pair = pair_of[single]
        for first, second in zip(group[0::2], group[1::2]):
            for arg in second.args[1:]:
                if isinstance(arg, fx.Node) and arg.op == "get_attr" and len(arg.users) == 1:
                    first.prepend(arg)
            args = (*first.args, *second.args[1:])
            with rw.graph.inserting_before(first):
                node = rw.call(pair, args, first, lambda: pair(*(value(a) if isinstance(a, fx.Node) else a
                                                                  for a in args)))
                outs = [rw.call(operator.getitem, (node, i), old, lambda i=i: value(node)[i])
                        for i, old in enumerate((first, second))]
            for old, new in zip((first, second), outs):
                r = by_node[old.name]
                r.node, r.op = node.name, _op_name(pair)
                r.outputs = {k: (new.name if v == old.name else v) for k, v in r.outputs.items()}
                rw.replace(old, new)
            pairs += 1
    return pairs


def _reason_key(reason: str) -> str:
    return reason.split(":", 1)[0]


# ---------------------------------------------------------------------------------------- the pass
def rewrite_linears(gm: fx.GraphModule, example_inputs: Sequence[Any], *, fuse_gated_mlp: bool = True,
                    pair_adapters: bool = True, strict: bool = False) -> RewriteReport:
    """Rewrite, in place, every linear of ``gm`` whose weight has an attached adapter.

    Args:
        gm: the GraphModule Dynamo hands to a backend (torch IR, before AOTAutograd).
        example_inputs: the backend's example inputs; placeholder ``i`` reads ``example_inputs[i]``.
        fuse_gated_mlp: emit ``gated_neuron_adapter`` for a neuron-adapted down projection whose input
            is ``act(gate) * up``.
        pair_adapters: emit one pair op for two units of a kind that read the same input (rank-adapted
            gate and up as separate units; neuron-adapted q and k, gate and up).
        strict: raise ``RewriteError`` (leaving ``gm`` unchanged) if a registered weight this graph
            reads would stay dense.

    Returns:
        The ``RewriteReport`` (also logged).

    Example::

        report = rewrite_linears(gm, example_inputs)
        assert report.rewritten == len(plan.adapted)
    """
    sites = find_linears(gm, example_inputs)
    shared = shared_uses(sites)
    report = RewriteReport()
    groups: dict[tuple[int, fx.Node], list[LinearSite]] = {}
    for site in sites:
        ok, reason = _should_rewrite(site, shared)
        if ok:
            groups.setdefault((id(site.ref.adapter), site.input), []).append(site)
        elif reason == NOT_REGISTERED:
            report.dense.append(site.left_dense(reason))
            report.counters["dense_unregistered"] += 1
        else:
            report.skipped.append(site.left_dense(reason))
            report.counters[f"skipped_{_reason_key(reason)}"] += 1
    report.unfound = unfound(gm, example_inputs, sites)
    report.experts = graph_experts(gm, example_inputs)
    report.counters["skipped_unfound"] += len(report.unfound)
    if strict and not report.complete:
        raise RewriteError("ranapass (strict): registered weights would stay dense; the graph is unchanged.\n"
                           + report.summary())
    if groups:
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        rw = _Rewriter(gm)
        for group in groups.values():
            try:
                report.rewrites.append(_rewrite_group(rw, group, order, fuse_gated_mlp))
            except Exception as e:
                raise RewriteError(f"ranapass: rewriting unit {group[0].ref.unit.name!r} at "
                                   f"{group[0].node.format_node()} failed: {e}") from e
        if pair_adapters:
            report.counters["paired_adapters"] = _pair_adapters(rw, report.rewrites)
        gm.graph.lint()
        gm.recompile()
    report.counters["rewritten_units"] = report.rewritten
    report.counters["rewritten_linears"] = sum(len(r.replaced) for r in report.rewrites)
    report.counters["ops"] = len({r.node for r in report.rewrites})
    _log_report(report)
    return report


def _log_report(report: RewriteReport) -> None:
    if not report.complete:
        log.warning("ranapass: %s", report.summary())
    elif not report.rewrites and report.dense:
        log.warning("ranapass: no linear of this graph has an attached adapter (%d dense); was "
                    "ranapass.attach(model, plan) called before compiling?", len(report.dense))
    else:
        log.info("ranapass: %s", report.summary())
