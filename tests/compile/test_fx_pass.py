"""The FX pass on graphs Dynamo captures: what it rewrites, what it leaves dense and says so, and that the
rewritten graph computes what the eager adapters compute (run here without Inductor; test_backend.py
compiles with it)."""

from __future__ import annotations

import collections
import logging
import operator

import pytest
import torch
from plans import build_plan, fresh_dynamo, logits, tiny_inputs, tiny_model  # noqa: F401 (fixture)
from torch import fx

import ranapass
from ranapass.attach import lookup
from ranapass.fx_pass import RewriteError, rewrite_linears

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

ARCHS = ["LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM", "GemmaForCausalLM",
         "GPTNeoXForCausalLM", "Phi3ForCausalLM", "mlp"]
RANAPASS_OPS = {torch.ops.ranapass.rank_adapter.default, torch.ops.ranapass.neuron_adapter.default,
                torch.ops.ranapass.gated_neuron_adapter.default, torch.ops.ranapass.rank_adapter_pair.default,
                torch.ops.ranapass.neuron_adapter_pair.default}


def capture(model, inputs, grad: bool = False, **kwargs):
    """Compile with a backend that runs the pass and then the graph as is: (graph module, report, output)."""
    graphs, reports = [], []

    def backend(gm, example_inputs):
        reports.append(rewrite_linears(gm, example_inputs, **kwargs))
        graphs.append(gm)
        return gm.forward

    with torch.set_grad_enabled(grad):
        out = logits(torch.compile(model, backend=backend, fullgraph=True), inputs)
    assert len(graphs) == 1
    return graphs[0], reports[0], out


def eager_adapted(model, plan, inputs):
    with torch.no_grad(), ranapass.attach(model, plan).eager():
        return logits(model, inputs)


def ops_in(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in RANAPASS_OPS]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_registered_unit_is_rewritten_once(arch):
    model, inputs = tiny_model(arch), tiny_inputs(arch)
    plan = build_plan(model, inputs)
    ref = eager_adapted(model, plan, inputs)
    gm, report, out = capture(model, inputs)

    members = sum(len(u.members) for u in plan.adapted)
    assert report.rewritten == len(plan.adapted)
    assert report.counters["rewritten_linears"] == members
    assert len(ops_in(gm)) == report.counters["ops"] == len(plan.adapted)
    assert report.complete and not report.skipped and not report.unfound
    assert not any(n.target is torch._C._nn.linear for n in gm.graph.nodes
                   if n.op == "call_function" and n.name not in {d.node for d in report.dense})
    expected_dense = [] if arch == "mlp" else [model.get_output_embeddings()]
    assert [model.get_submodule(d.path) for d in report.dense] == expected_dense
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_grouped_unit_is_one_op_sliced_per_member():
    model, inputs = tiny_model("LlamaForCausalLM"), tiny_inputs("LlamaForCausalLM")
    plan = build_plan(model, inputs)
    ranapass.attach(model, plan)
    gm, report, _ = capture(model, inputs)

    qkv = next(r for r in report.rewrites if r.unit == "model.layers.0.self_attn.{q_proj,k_proj,v_proj}")
    assert qkv.members == tuple(f"model.layers.0.self_attn.{p}_proj" for p in "qkv") and not qkv.partial
    op = next(n for n in gm.graph.nodes if n.name == qkv.node)
    slices = [u for u in op.users if u.target is operator.getitem]
    assert [s.args[1][1] for s in slices] == [slice(0, 64), slice(64, 96), slice(96, 128)]  # GQA: k, v narrower
    assert op.meta["example_value"].shape == (*inputs.shape, 128)
    assert op.meta["nn_module_stack"] and op.meta["stack_trace"]
    assert [s.meta["example_value"].shape[-1] for s in slices] == [64, 32, 32]


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "GPTNeoXForCausalLM", "mlp"])
def test_budget_one_plan_equals_dense(arch):
    model, inputs = tiny_model(arch), tiny_inputs(arch)
    with torch.no_grad():
        dense = logits(model, inputs)
    ranapass.attach(model, build_plan(model, inputs, keep=1.0))
    _, report, out = capture(model, inputs)
    assert report.rewritten > 0
    torch.testing.assert_close(out, dense, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fuse", [True, False])
def test_gated_mlp_fusion_is_optional_and_exact(fuse):
    model, inputs = tiny_model("LlamaForCausalLM"), tiny_inputs("LlamaForCausalLM")
    plan = build_plan(model, inputs)
    ref = eager_adapted(model, plan, inputs)
    gm, report, out = capture(model, inputs, fuse_gated_mlp=fuse)

    down = [r for r in report.rewrites if r.unit.endswith("down_proj")]
    assert {r.op for r in down} == {"ranapass.gated_neuron_adapter" if fuse else "ranapass.neuron_adapter"}
    silus = [n for n in gm.graph.nodes if n.target is torch.nn.functional.silu]
    assert len(silus) == (0 if fuse else 2)  # the fused op computes act(gate) * up itself
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("pair", [True, False])
def test_units_reading_one_input_share_one_op(pair):
    """Units of one kind that read one input, each with its own weights and mask, become one pair op (optional):
    rank-adapted gate and up a ``rank_adapter_pair``, neuron-adapted k and v a ``neuron_adapter_pair``."""
    model, inputs = tiny_model("LlamaForCausalLM"), tiny_inputs("LlamaForCausalLM")
    plan = build_plan(model, inputs, group=False)  # neuron adapters where in > out: k, v (GQA) and down
    ref = eager_adapted(model, plan, inputs)
    gm, report, out = capture(model, inputs, pair_adapters=pair)

    layers = model.config.num_hidden_layers
    pair_ops = {torch.ops.ranapass.rank_adapter_pair.default: ("gate", "up"),
                torch.ops.ranapass.neuron_adapter_pair.default: ("k", "v")}
    pairs = [n for n in gm.graph.nodes if n.target in pair_ops]
    assert len(pairs) == report.counters["paired_adapters"] == (2 * layers if pair else 0)
    assert len(ops_in(gm)) == report.counters["ops"] == len(plan.adapted) - len(pairs)
    for op, names in pair_ops.items():
        paired = {r.members for r in report.rewrites if r.op == f"ranapass.{op._schema.name.split('::')[-1]}"}
        block = "mlp" if "up" in names else "self_attn"
        assert paired == ({(f"model.layers.{i}.{block}.{p}_proj",) for i in range(layers) for p in names}
                          if pair else set())
    for node in pairs:
        assert [u.target for u in node.users] == [operator.getitem] * 2
        assert node.meta["nn_module_stack"] and len(node.meta["example_value"]) == 2
    assert report.complete
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


class TwoInputs(torch.nn.Module):
    """Two linears that read one input when ``shared`` and different inputs otherwise."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(32, 16)
        self.b = torch.nn.Linear(32, 24)
        self.shared = True

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x if self.shared else x.flip(-1))], -1)


def test_members_reading_different_inputs_get_one_op_each():
    model, inputs = TwoInputs().eval(), torch.randn(3, 32)
    plan = build_plan(model, inputs)  # a and b share the input here: one unit
    assert [u.members for u in plan.adapted] == [("a", "b")]
    model.shared = False
    ref = eager_adapted(model, plan, inputs)
    gm, report, out = capture(model, inputs)

    assert report.rewritten == 1 and report.counters["ops"] == 2
    assert [r.members for r in report.rewrites] == [("a",), ("b",)] and all(r.partial for r in report.rewrites)
    assert "partial units" in report.summary()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


class Twice(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(32, 32)

    def forward(self, x):
        return self.lin(torch.relu(self.lin(x)))


def test_adapter_called_twice_registers_its_buffers_once():
    model, inputs = Twice().eval(), torch.randn(4, 32)
    plan = build_plan(model, inputs)
    ref = eager_adapted(model, plan, inputs)
    gm, report, out = capture(model, inputs)

    assert report.rewritten == 1 and report.counters["ops"] == 2
    rana_buffers = [name for name, _ in gm.named_buffers() if name.startswith("rana_")]
    assert len(rana_buffers) == 4  # B, At, thresholds, bias
    assert all(name in gm._param_name_to_source for name in rana_buffers)
    bound = lookup(model.lin.weight).adapter
    assert dict(gm.named_buffers())["rana_lin_thresholds"] is bound.buffers["thresholds"]  # no copy
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_neuron_adapter_registers_its_tickets_as_a_buffer():
    """A neuron op's tickets (its decode kernel's workspace) reach the graph as the bound adapter's own
    buffer, like its weights: a static input that every call leaves zero."""
    model, inputs = Twice().eval(), torch.randn(4, 32)
    ranapass.attach(model, build_plan(model, inputs, neuron="all"))
    gm, report, _ = capture(model, inputs)

    assert report.rewritten == 1
    bound = lookup(model.lin.weight).adapter
    tickets = dict(gm.named_buffers())["rana_lin_tickets"]
    assert tickets is bound.buffers["tickets"] and tickets.dtype == torch.int32 and not tickets.any()
    assert "rana_lin_tickets" in gm._param_name_to_source
    ops = [n for n in gm.graph.nodes if n.target is torch.ops.ranapass.neuron_adapter.default]
    assert ops and all(n.args[-1].target == "rana_lin_tickets" for n in ops)


class TracedLinear(torch.nn.Linear):
    """Not a leaf for fx.symbolic_trace (defined outside torch.nn): traced into F.linear with get_attr weights."""


class Mixed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.leaf = torch.nn.Linear(32, 48)
        self.traced = TracedLinear(48, 32)

    def forward(self, x):
        return self.traced(torch.relu(self.leaf(x)))


def test_call_module_and_get_attr_forms():
    model, inputs = Mixed().eval(), torch.randn(5, 32)
    plan = build_plan(model, inputs, neuron="none")
    ref = eager_adapted(model, plan, inputs)
    gm = fx.symbolic_trace(model)  # what Dynamo gives with inline_inbuilt_nn_modules=False (torch 2.11)
    kinds = {(n.op, n.args[1].op if n.op == "call_function" else "") for n in gm.graph.nodes
             if n.op == "call_module" or n.target is torch._C._nn.linear}
    assert kinds == {("call_module", ""), ("call_function", "get_attr")}

    report = rewrite_linears(gm, [])
    assert report.rewritten == 2 and {r.old_op for r in report.rewrites} == {"call_module:nn.Linear",
                                                                             "torch._C._nn.linear"}
    with torch.no_grad():
        torch.testing.assert_close(gm(inputs), ref, rtol=0, atol=1e-6)


class EinsumUser(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(32, 32, bias=False)

    def forward(self, x):
        return torch.einsum("ij,kj->ik", x, self.lin.weight)


class MatmulUser(torch.nn.Module):
    """Reads ``lin``'s weight in a linear of its own (``x @ w.t()``), outside ``lin``: the eager path, which
    swaps ``lin.forward``, leaves this use dense, and so must the pass."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(32, 32, bias=False)

    def forward(self, x):
        return self.lin(x) + x @ self.lin.weight.t()


def plan_for_lin(model, inputs):
    """A plan for ``model.lin`` from a model that calls it as a module (same parameter names, so fingerprint)."""
    return build_plan(torch.nn.Sequential(collections.OrderedDict(lin=model.lin)), inputs)


def test_registered_weight_read_outside_a_linear_is_named():
    model, inputs = EinsumUser().eval(), torch.randn(4, 32)
    ranapass.attach(model, plan_for_lin(model, inputs))
    _, report, _ = capture(model, inputs)
    assert report.rewritten == 0 and report.unfound == ["lin"] and not report.complete
    assert "read outside any linear): lin" in report.summary()


def test_weight_read_by_another_modules_linear_stays_dense_at_every_use():
    model, inputs = MatmulUser().eval(), torch.randn(4, 32)
    plan = plan_for_lin(model, inputs)
    with torch.no_grad():
        dense = model(inputs)
    ranapass.attach(model, plan)
    _, report, out = capture(model, inputs)
    assert report.rewritten == 0 and not report.complete
    assert [(s.path, s.reason.split(":")[0]) for s in report.skipped] == [("lin", "shared_use")] * 2
    assert "the top-level module" in report.skipped[0].reason
    torch.testing.assert_close(out, dense)


class TiedToEmbedding(torch.nn.Module):
    """A linear whose weight an embedding also reads (as tied input/output embeddings are)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(48, 32)
        self.lin = torch.nn.Linear(32, 48, bias=False)
        self.lin.weight = self.emb.weight

    def forward(self, ids):
        return self.lin(self.emb(ids))


def test_weight_tied_to_an_embedding_stays_dense_and_says_why():
    model, ids = TiedToEmbedding().eval(), torch.randint(0, 48, (2, 8))
    plan = build_plan(torch.nn.Sequential(collections.OrderedDict(lin=model.lin)), torch.randn(16, 32))
    ranapass.attach(model, plan, check_fingerprint=False)
    with torch.no_grad():
        dense = model(ids)
    _, report, out = capture(model, ids)
    assert report.rewritten == 0 and [s.reason.split(":")[0] for s in report.skipped] == ["shared_use"]
    assert "embedding" in report.skipped[0].reason and "shared_use" in report.summary()
    torch.testing.assert_close(out, dense)


def test_left_dense_with_reasons():
    model, inputs = tiny_model("Qwen2ForCausalLM"), tiny_inputs("Qwen2ForCausalLM")
    plan = build_plan(model, inputs)
    ranapass.attach(model, plan)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.bias.add_(1.0)  # after attach: the bound bias is stale
    _, report, out = capture(model, inputs)

    assert [(s.path, s.reason.split(":")[0]) for s in report.skipped] == [
        ("model.layers.0.self_attn.q_proj", "bias_mismatch")]
    assert report.counters["skipped_bias_mismatch"] == 1
    qkv = next(r for r in report.rewrites if r.unit == "model.layers.0.self_attn.{q_proj,k_proj,v_proj}")
    assert qkv.partial and qkv.members == ("model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj")
    assert report.rewritten == len(plan.adapted)


def test_grad_mode_and_stale_adapters_stay_dense():
    model, inputs = tiny_model("LlamaForCausalLM"), tiny_inputs("LlamaForCausalLM")
    plan = build_plan(model, inputs)
    ranapass.attach(model, plan)
    with torch.no_grad():
        dense = logits(model, inputs)
    _, report, out = capture(model, inputs, grad=True)
    assert report.rewritten == 0 and {s.reason.split(":")[0] for s in report.skipped} == {"requires_grad"}
    torch.testing.assert_close(out.detach(), dense)

    torch._dynamo.reset()
    model.to(torch.float64)  # same Parameter objects, new dtype: the bound adapters are stale
    _, report, _ = capture(model, inputs)
    assert report.rewritten == 0 and {s.reason.split(":")[0] for s in report.skipped} == {"stale_adapter"}
    assert len(report.skipped) == sum(len(u.members) for u in plan.adapted)


def test_strict_raises_and_leaves_the_graph_unchanged():
    model, inputs = tiny_model("mlp"), tiny_inputs("mlp")
    ranapass.attach(model, build_plan(model, inputs))
    seen = {}

    def backend(gm, example_inputs):
        seen["before"] = gm.code
        with pytest.raises(RewriteError, match="requires_grad"):
            rewrite_linears(gm, example_inputs, strict=True)
        seen["after"] = gm.code
        return gm.forward

    torch.compile(model, backend=backend)(inputs)  # grad mode: inputs of the linears require grad
    assert seen["before"] == seen["after"]


def test_graph_without_adapters_warns(caplog):
    model, inputs = tiny_model("mlp"), tiny_inputs("mlp")
    with caplog.at_level(logging.INFO, logger="ranapass.fx_pass"):
        _, report, _ = capture(model, inputs)
    assert report.rewritten == 0 and len(report.dense) == 2
    assert any(r.levelno == logging.WARNING and "ranapass.attach" in r.message for r in caplog.records)
