"""Graph-diff inspection: which nodes of the captured graph the ranapass pass rewrote, and into what.

``diff(model, example_inputs)`` traces the model with Dynamo through a capturing backend that renders
each graph before the pass, runs the pass, renders it again and runs the rewritten graph without
compiling it. The result holds a per-node table (module path, old op, new op, nB, expected kept
ranks, FLOPs before/after) and a unified diff of the graph code.

The rendering keeps the diff to what changed (a raw ``print_readable`` diff is mostly noise,
reference/compile.md §5): one line per node, weights shown by parameter name, adapter buffers
inlined into the op call, and each node that now stands for a replaced linear shown under the
linear's old name, so the users downstream do not change.
"""

from __future__ import annotations

import dataclasses
import difflib
import html
import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from ranapass.attach import attachment_of
from ranapass.backend import RanaBackend, unrewritten_units
from ranapass.fx_pass import rewrite_linears
from ranapass.rewrite_report import RewriteReport

__all__ = ["diff", "GraphDiff", "GraphCapture"]


@dataclasses.dataclass
class GraphCapture:
    """One graph Dynamo captured: its code before and after the pass, and the pass's report."""

    before: list[str]
    after: list[str]
    report: RewriteReport


class GraphDiff:
    """The rewrite of a model's captured graph(s), for reading.

    ``summary()`` is a few lines, ``table()`` one row per rewritten op or dense linear, ``unified()``
    the code diff; ``to_html()`` puts the three on one page and ``to_dict()`` gives them as data.
    """

    def __init__(self, graphs: list[GraphCapture], unrewritten: list[str] | None):
        self.graphs = graphs
        self.unrewritten = unrewritten  # attached units no graph rewrote (None: no plan attached)

    # ------------------------------------------------------------------ data
    def rows(self) -> list[dict[str, Any]]:
        """One dict per rewritten op, then per linear left dense (registered first), then per expert weight."""
        rows = []
        for g, capture in enumerate(self.graphs):
            report = capture.report
            for r in report.rewrites:
                rows.append({"graph": g, "module": r.unit if len(r.members) > 1 else r.members[0],
                             "old_op": f"{r.old_op} x{len(r.replaced)}" if len(r.replaced) > 1 else r.old_op,
                             "new_op": r.op + (" (partial)" if r.partial else ""), "nB": r.width,
                             "expected_kept": r.expected_kept, "flops_before": r.flops_before,
                             "flops_after": r.flops_after})
            for d, what, why in [*((d, "linear", d.reason) for d in report.skipped),
                                 *((d, "linear", "no adapter") for d in report.dense),
                                 *((d, "3D expert weight", d.reason) for d in report.experts)]:
                rows.append({"graph": g, "module": d.path, "old_op": what, "new_op": f"dense ({why.split(':')[0]})",
                             "nB": None, "expected_kept": None, "flops_before": d.flops, "flops_after": d.flops})
        return rows

    def totals(self) -> dict[str, float]:
        """FLOPs per token summed over the rows: rewritten linears, and all linears and expert weights of the graphs."""
        rows = self.rows()
        rewritten = [r for r in rows if not r["new_op"].startswith("dense")]
        return {"rewritten_before": sum(r["flops_before"] for r in rewritten),
                "rewritten_after": sum(r["flops_after"] for r in rewritten),
                "all_before": sum(r["flops_before"] for r in rows),
                "all_after": sum(r["flops_after"] for r in rows)}

    def to_dict(self) -> dict[str, Any]:
        reports = [c.report for c in self.graphs]
        return {"graphs": len(self.graphs),
                "units_rewritten": sum(r.rewritten for r in reports),
                "linears_rewritten": sum(r.counters["rewritten_linears"] for r in reports),
                "ops": sum(r.counters["ops"] for r in reports),
                "left_dense": [{"module": d.path, "reason": d.reason} for r in reports for d in r.skipped],
                "unfound": [p for r in reports for p in r.unfound],
                "experts": [{"module": d.path, "flops": d.flops} for r in reports for d in r.experts],
                "unrewritten_units": self.unrewritten,
                "totals": self.totals(), "rows": self.rows(), "unified": self.unified()}

    # ------------------------------------------------------------------ text
    def summary(self) -> str:
        lines = []
        for g, capture in enumerate(self.graphs):
            lines.append(f"graph {g}: {capture.report.summary()}")
        t = self.totals()
        if t["rewritten_before"]:
            lines.append(f"FLOPs/token of the rewritten linears: {t['rewritten_before'] / 1e6:.3f} M -> "
                         f"{t['rewritten_after'] / 1e6:.3f} M ({t['rewritten_after'] / t['rewritten_before']:.3f}x, "
                         "at the plan's expected kept ranks)")
        if t["all_before"]:
            lines.append(f"FLOPs/token of all linears in the graph(s): {t['all_before'] / 1e6:.3f} M -> "
                         f"{t['all_after'] / 1e6:.3f} M ({t['all_after'] / t['all_before']:.3f}x)")
        if self.unrewritten:
            lines.append(f"attached units never rewritten: {', '.join(self.unrewritten)}")
        return "\n".join(lines)

    def table(self) -> str:
        """Fixed-width table: module, old op, new op, nB, expected kept, MFLOP/token before and after."""
        rows = self.rows()
        width = max([len(r["module"]) for r in rows] + [6])
        multi = len(self.graphs) > 1
        head = (f"{'g':>2} " if multi else "") + f"{'module':<{width}}  {'old op':<24} {'new op':<40} " \
            f"{'nB':>5} {'kept':>7} {'MFLOP/tok':>10} {'-> after':>9}"
        lines = [head, "-" * len(head)]
        for r in rows:
            nb = "" if r["nB"] is None else str(r["nB"])
            kept = "" if r["expected_kept"] is None else f"{r['expected_kept']:.1f}"
            lines.append((f"{r['graph']:>2} " if multi else "") + f"{r['module']:<{width}}  {r['old_op']:<24} "
                         f"{r['new_op']:<40} {nb:>5} {kept:>7} {r['flops_before'] / 1e6:>10.4f} "
                         f"{r['flops_after'] / 1e6:>9.4f}")
        return "\n".join(lines)

    def unified(self, context: int = 1) -> str:
        """Unified diff of each graph's code before and after the pass."""
        out = []
        for g, c in enumerate(self.graphs):
            out.extend(difflib.unified_diff(c.before, c.after, f"graph {g}: before ranapass",
                                            f"graph {g}: after ranapass", n=context, lineterm=""))
        return "\n".join(out)

    def __str__(self) -> str:
        return "\n\n".join([self.summary(), self.table(), self.unified()])

    def to_html(self) -> str:
        """A self-contained HTML page: summary, table and coloured diff."""
        def diff_line(line: str) -> str:
            cls = {"+": "add", "-": "del", "@": "hunk"}.get(line[:1], "")
            if line.startswith(("+++", "---")):
                cls = "file"
            return f'<span class="{cls}">{html.escape(line)}</span>'

        rows = self.rows()
        head = ["module", "old op", "new op", "nB", "expected kept", "MFLOP/tok before", "MFLOP/tok after"]
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in (
                r["module"], r["old_op"], r["new_op"], "" if r["nB"] is None else r["nB"],
                "" if r["expected_kept"] is None else f"{r['expected_kept']:.1f}",
                f"{r['flops_before'] / 1e6:.4f}", f"{r['flops_after'] / 1e6:.4f}")) + "</tr>"
            for r in rows)
        return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>ranapass graph diff</title><style>
body {{ font-family: sans-serif; margin: 2em; }} pre {{ background: #f6f8fa; padding: 1em; overflow-x: auto; }}
table {{ border-collapse: collapse; font-size: 90%; }} td, th {{ border: 1px solid #ccc; padding: 2px 6px; }}
td:nth-child(n+4) {{ text-align: right; }} .add {{ color: #116329; background: #dafbe1; }}
.del {{ color: #82071e; background: #ffebe9; }} .hunk {{ color: #0550ae; }} .file {{ font-weight: bold; }}
</style></head><body>
<h1>ranapass graph diff</h1>
<pre>{html.escape(self.summary())}</pre>
<h2>Rewritten and dense linears</h2>
<table><tr>{"".join(f"<th>{h}</th>" for h in head)}</tr>{body}</table>
<h2>Graph code, before and after</h2>
<pre>{chr(10).join(diff_line(line) for line in self.unified().splitlines())}</pre>
</body></html>
"""


# ---------------------------------------------------------------------------------------- rendering
def _format_arg(arg: Any, name_of: dict[fx.Node, str]) -> str:
    if isinstance(arg, fx.Node):
        return name_of.get(arg, arg.name)
    if isinstance(arg, slice):
        parts = ["" if v is None else str(v) for v in (arg.start, arg.stop)]
        return ":".join(parts) + (f":{arg.step}" if arg.step is not None else "")
    if arg is Ellipsis:
        return "..."
    if isinstance(arg, tuple):
        return "(" + ", ".join(_format_arg(a, name_of) for a in arg) + ("," if len(arg) == 1 else "") + ")"
    if isinstance(arg, list):
        return "[" + ", ".join(_format_arg(a, name_of) for a in arg) + "]"
    if isinstance(arg, dict):
        return "{" + ", ".join(f"{k!r}: {_format_arg(v, name_of)}" for k, v in arg.items()) + "}"
    return repr(arg)


def _target(node: fx.Node) -> str:
    if isinstance(node.target, torch._ops.OpOverload):
        return f"torch.ops.{node.target._schema.name.replace('::', '.')}"
    name = fx.node._get_qualified_name(node.target) if callable(node.target) else str(node.target)
    return name.replace("_operator.", "operator.", 1) if name.startswith("_operator.") else name


def render(gm: fx.GraphModule, name_of: dict[fx.Node, str]) -> list[str]:
    """One line per computing node: ``name = target(args)``; placeholders and ``get_attr`` inline as names."""
    lines = []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            continue
        args = [_format_arg(a, name_of) for a in node.args]
        args += [f"{k}={_format_arg(v, name_of)}" for k, v in node.kwargs.items()]
        name = name_of.get(node, node.name)
        if node.op == "output":
            lines.append(f"return {', '.join(args)}")
        elif node.op == "call_function" and node.target is operator.getitem and len(node.args) == 2:
            lines.append(f"{name} = {args[0]}[{_format_arg(node.args[1], name_of).strip('()')}]")
        elif node.op == "call_method":
            lines.append(f"{name} = {args[0]}.{node.target}({', '.join(args[1:])})")
        elif node.op == "call_module":
            lines.append(f"{name} = self.{node.target}({', '.join(args)})")
        else:
            lines.append(f"{name} = {_target(node)}({', '.join(args)})")
    return lines


def _input_names(gm: fx.GraphModule, example_inputs: Sequence[Any], model: torch.nn.Module) -> dict[fx.Node, str]:
    """Display names of placeholders and ``get_attr`` nodes: the model's parameter/buffer name when the
    tensor is one of the model's (by identity), else the node's own name."""
    by_id = {id(t): name for name, t in [*model.named_parameters(remove_duplicate=False),
                                          *model.named_buffers(remove_duplicate=False)]}
    names = {}
    for node, value in zip(gm.graph.find_nodes(op="placeholder"), example_inputs):
        names[node] = by_id.get(id(value), node.name)
    for node in gm.graph.find_nodes(op="get_attr"):
        names[node] = "self." + node.target
    return names


# ---------------------------------------------------------------------------------------- entry point
def diff(model: torch.nn.Module, example_inputs: Any, *, backend: RanaBackend | None = None) -> GraphDiff:
    """Trace ``model`` on ``example_inputs``, run the ranapass pass, and show what it changed.

    The graphs are captured with a throwaway backend and run uncompiled; Dynamo's caches are then
    reset with ``torch.compiler.reset()`` so a later ``torch.compile`` traces afresh (this also drops
    the caches of other compiled functions in the process, which then recompile on their next call).

    Args:
        model: the model, with a plan attached (without one the diff shows every linear left dense).
        example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs.
        backend: whose options (``fuse_gated_mlp``, ``pair_adapters``, ``strict``) the pass uses;
            default ``RanaBackend()``.

    Example::

        ranapass.attach(model, plan)
        d = ranapass.diff(model, tokenizer("Hello", return_tensors="pt").input_ids)
        print(d.summary()); print(d.table()); print(d.unified())
    """
    config = backend or RanaBackend()
    graphs: list[GraphCapture] = []

    def capture(gm: fx.GraphModule, inputs: Sequence[Any]):
        names = _input_names(gm, inputs, model)
        before = render(gm, names)
        report = rewrite_linears(gm, inputs, fuse_gated_mlp=config.fuse_gated_mlp,
                                 pair_adapters=config.pair_adapters, strict=config.strict)
        names = _input_names(gm, inputs, model)
        by_name = {n.name: n for n in gm.graph.nodes}
        for r in report.rewrites:  # show what stands for a replaced linear under the linear's name
            for old, new in r.outputs.items():
                names[by_name[new]] = old
        graphs.append(GraphCapture(before, render(gm, names), report))
        return gm.forward

    if isinstance(example_inputs, dict):
        args, kwargs = (), example_inputs
    else:
        args, kwargs = (example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)), {}
    try:
        with torch.no_grad():
            torch.compile(model, backend=capture)(*args, **kwargs)
    finally:
        torch.compiler.reset()
    if not graphs:
        raise RuntimeError("Dynamo captured no graph of the model (was it already compiled past "
                           "torch._dynamo.config.recompile_limit?); call torch.compiler.reset() and retry")
    unrewritten = None
    if attachment_of(model) is not None:
        unrewritten = unrewritten_units(model, [g.report for g in graphs])
    return GraphDiff(graphs, unrewritten)
