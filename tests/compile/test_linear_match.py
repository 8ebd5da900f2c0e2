"""``ranapass.linear_match``: every shape of a linear in a Dynamo graph is found, with its weight's layout,
and nothing else is. Each match is also checked by value: running the captured graph, the match's output
equals ``F.linear(input, as_out_in(weight, layout), bias)``."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from architectures import build
from torch import fx
from transformers.pytorch_utils import Conv1D

from ranapass.linear_match import IN_OUT, OUT_IN, as_out_in, linear_modules, match_linears


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def capture(model: torch.nn.Module, *inputs: torch.Tensor) -> tuple[fx.GraphModule, list]:
    """The (single) graph Dynamo hands a backend for ``model(*inputs)``, with its example inputs."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(*inputs)
    assert len(graphs) == 1
    return graphs[0]


def node_values(gm: fx.GraphModule, example_inputs: list) -> dict[fx.Node, object]:
    """The value of every node when ``gm`` runs on its example inputs (copied: later in-place ops such as
    Falcon's ``mlp_output += attention_output`` would change them)."""
    values = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            values[n] = out.clone() if isinstance(out, torch.Tensor) else out
            return out

    with torch.no_grad():
        Recorder(gm).run(*example_inputs)
    return values


def checked_matches(model: torch.nn.Module, *inputs: torch.Tensor):
    """The matches of ``model``'s graph, each verified by value."""
    gm, example_inputs = capture(model, *inputs)
    matches = match_linears(gm, example_inputs)
    values = node_values(gm, example_inputs)
    for m in matches:
        assert m.nodes[-1] is m.output
        bias = m.bias if m.bias_resolved else values[m.bias_node]
        expected = F.linear(values[m.input], as_out_in(m.weight, m.layout), bias)
        torch.testing.assert_close(values[m.output], expected, rtol=1e-5, atol=1e-6)
    return matches


# ---------------------------------------------------------------------------------------- modules
class FalconLinear(torch.nn.Linear):
    """Falcon's linear: ``x @ w.T`` and a separate bias add."""

    def forward(self, x):
        y = x @ self.weight.T
        return y if self.bias is None else y + self.bias


class Transposes(torch.nn.Module):
    """Every spelling of ``x @ w^T`` and ``x @ w``."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(12, 16))    # (out, in)
        self.v = torch.nn.Parameter(torch.randn(16, 12))    # (in, out)
        self.b = torch.nn.Parameter(torch.randn(12))

    def forward(self, x):
        return (torch.matmul(x, self.w.t()) + x.matmul(self.w.transpose(0, 1)) + x @ self.w.mT
                + x @ self.w.permute(1, 0) + (x @ self.v + self.b) + F.linear(x, self.v.t()))


class Fn(torch.nn.Module):
    def __init__(self, fn, **params):
        super().__init__()
        self.fn = fn
        for k, v in params.items():
            setattr(self, k, torch.nn.Parameter(v))

    def forward(self, *xs):
        return self.fn(self, *xs)


X = torch.randn(2, 5, 16)


def test_conv1d_is_an_addmm_with_views_and_an_in_out_weight():
    module = Conv1D(24, 16)
    (m,) = checked_matches(module, X)
    assert (m.op, m.layout, m.weight is module.weight, m.bias is module.bias) == ("addmm", IN_OUT, True, True)
    assert m.input.op == "placeholder" and (m.in_features, m.out_features) == (16, 24)
    assert [n.target for n in m.nodes] == ["view", torch.addmm, "view"]


def test_conv1d_on_a_2d_input():
    (m,) = checked_matches(Conv1D(24, 16), torch.randn(7, 16))
    assert m.op == "addmm" and m.layout == IN_OUT and m.input.op == "placeholder"


@pytest.mark.parametrize("bias", [True, False])
def test_falcon_linear_is_a_matmul_by_the_transpose(bias):
    module = FalconLinear(16, 8, bias=bias)
    (m,) = checked_matches(module, X)
    assert (m.op, m.layout, m.weight is module.weight) == ("matmul", OUT_IN, True)
    assert (m.bias is module.bias) if bias else (m.bias is None and m.bias_node is None)
    assert [n.target for n in m.nodes] == [getattr, operator.matmul, operator.add][:3 if bias else 2]


def test_every_spelling_of_a_transposed_weight():
    model = Transposes()
    matches = checked_matches(model, X)
    assert [(m.op, m.layout) for m in matches] == [("matmul", OUT_IN)] * 4 + [("matmul", IN_OUT), ("linear", IN_OUT)]
    assert [m.weight is model.w for m in matches] == [True] * 4 + [False] * 2
    assert matches[4].bias is model.b and all(m.bias is None for m in matches[:4])


def test_f_linear_and_nn_linear():
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.GELU(), torch.nn.Linear(8, 4, bias=False))
    matches = checked_matches(model, X)
    assert [(m.op, m.layout, m.bias_resolved) for m in matches] == [("linear", OUT_IN, True)] * 2
    assert matches[0].weight is model[0].weight and matches[1].bias is None
    assert matches[1].input.args[0] is matches[0].output  # gelu(first)


def test_a_computed_bias_is_marked_unresolved():
    model = Fn(lambda s, x: F.linear(x, s.w, s.b * 2), w=torch.randn(8, 16), b=torch.randn(8))
    (m,) = checked_matches(model, X)
    assert m.bias is None and m.bias_node is not None and not m.bias_resolved


def test_a_bias_that_is_not_one_per_output_stays_outside():
    model = Fn(lambda s, x: x @ s.w.T + s.b, w=torch.randn(8, 16), b=torch.randn(5, 8))
    (m,) = checked_matches(model, X)
    assert m.bias is None and m.output.target is not torch.add and len(m.nodes) == 2


def test_a_matmul_read_twice_keeps_its_bias_add_outside():
    model = Fn(lambda s, x: (lambda y: (y + s.b) * y)(x @ s.w.T), w=torch.randn(8, 16), b=torch.randn(8))
    (m,) = checked_matches(model, X)
    assert m.bias is None and m.op == "matmul"


def test_is_weight_accepts_tensors_that_are_not_parameters():
    class Buffered(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w", torch.randn(8, 16))

        def forward(self, x):
            return x @ self.w.T

    model = Buffered()
    gm, example_inputs = capture(model, X)
    assert match_linears(gm, example_inputs) == []
    (m,) = match_linears(gm, example_inputs, is_weight=lambda t: t is model.w)
    assert m.weight is model.w and m.layout == OUT_IN


# ---------------------------------------------------------------------------------------- negatives
def test_a_matmul_of_two_activations_is_not_a_linear():
    model = Fn(lambda s, a, b: a @ b.transpose(-1, -2) + torch.matmul(a, b[0].t()))
    gm, example_inputs = capture(model, X, torch.randn(2, 7, 16))
    assert match_linears(gm, example_inputs) == []


def test_attention_scores_are_not_linears():
    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = (torch.nn.Linear(16, 16) for _ in range(3))

        def forward(self, x):
            q, k, v = self.q(x), self.k(x), self.v(x)
            return torch.softmax(q @ k.transpose(-2, -1), -1) @ v

    model = Attention()
    matches = checked_matches(model, X)
    assert [m.weight for m in matches] == [model.q.weight, model.k.weight, model.v.weight]


def test_a_weight_used_as_an_embedding_is_not_a_linear():
    model = Fn(lambda s, ids: F.embedding(ids, s.w) + s.w[ids] + s.w.t()[:, 0], w=torch.randn(10, 16))
    gm, example_inputs = capture(model, torch.randint(0, 10, (2, 5)))
    assert match_linears(gm, example_inputs) == []


def test_a_tied_embedding_matches_only_where_it_is_a_linear():
    model = Fn(lambda s, ids: F.linear(F.embedding(ids, s.w), s.w), w=torch.randn(10, 16))
    (m,) = checked_matches(model, torch.randint(0, 10, (2, 5)))
    assert m.weight is model.w and m.op == "linear"


def test_3d_expert_weights_and_a_weight_on_the_left_are_not_linears():
    model = Fn(lambda s, x, h: (x @ s.e.transpose(-2, -1)).sum() + (s.w @ h).sum(),
               e=torch.randn(2, 8, 16), w=torch.randn(8, 16))
    gm, example_inputs = capture(model, torch.randn(2, 5, 16), torch.randn(16, 3))
    assert match_linears(gm, example_inputs) == []


# ---------------------------------------------------------------------------------------- real families
@pytest.mark.parametrize("family", ["gpt2", "falcon", "llama"])
def test_every_linear_module_of_a_family_is_matched_once_with_its_layout(family):
    model = build(family)
    modules = linear_modules(model)
    matches = checked_matches(model, torch.randint(0, 128, (2, 8)))
    by_weight = {id(m.weight): m for m in matches}
    assert len(by_weight) == len(matches) == len(modules)
    for path, lm in modules.items():
        match = by_weight[id(lm.module.weight)]
        assert match.layout == lm.layout, path
        assert (match.in_features, match.out_features) == (lm.in_features, lm.out_features)


# ---------------------------------------------------------------------------------------- modules (calibration)
def test_linear_modules_names_the_layouts_and_as_out_in_gives_the_math():
    gpt2, falcon = build("gpt2"), build("falcon")
    layouts = {path: lm.layout for path, lm in linear_modules(gpt2).items()}
    assert layouts["transformer.h.0.attn.c_attn"] == IN_OUT and layouts["lm_head"] == OUT_IN
    assert all(lm.layout == OUT_IN for lm in linear_modules(falcon).values())
    assert "transformer.wte" not in layouts
    for lm in linear_modules(gpt2).values():
        x = torch.randn(3, lm.in_features)
        w = as_out_in(lm.module.weight, lm.layout)
        assert w.shape == (lm.out_features, lm.in_features)
        torch.testing.assert_close(lm.module(x), F.linear(x, w, lm.module.bias))
    with pytest.raises(ValueError, match="layout"):
        as_out_in(lm.module.weight, "rows")


def test_call_module_linears_without_inlining():
    """With nn-module inlining off (torch 2.11 honours the flag), a linear module is one call_module node."""
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4, bias=False))
    gm = fx.symbolic_trace(model)
    matches = match_linears(gm, [])
    assert [(m.op, m.layout, m.output.target) for m in matches] == [("call_module:nn.Linear", OUT_IN, "0"),
                                                                   ("call_module:nn.Linear", OUT_IN, "2")]
    assert matches[0].weight is gm.get_submodule("0").weight and matches[1].bias is None
