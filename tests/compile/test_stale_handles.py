"""A compiled handle always runs the model's current attachment, through one shared backend object.

Each scenario compares compiled outputs with the eager result of the attachment current at the call
(fp32, ``rtol=1e-4, atol=1e-5``): a budget sweep re-attaching one model, detach, re-attach, two models
with two plans, ``torch.compiler.reset()``, compiling before attaching, more attachment changes than
Dynamo's recompile limit; and an unchanged attachment does not recompile.
"""

from __future__ import annotations

import pytest
import torch
from plans import build_plan, fresh_dynamo, logits, tiny_inputs, tiny_model  # noqa: F401

import ranapass
from ranapass.attach import temporarily_attached
from ranapass.backend import RanaBackend

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

ARCH = "LlamaForCausalLM"
FP32 = dict(rtol=1e-4, atol=1e-5)
COMPILERS = ["aot_eager", "inductor"]


def eager(model, plan, inputs):
    """The eager output of ``model`` running ``plan`` (None: dense); the current attachment is kept."""
    with torch.no_grad():
        if plan is None:
            return logits(model, inputs)
        with temporarily_attached(model, plan):
            return logits(model, inputs)


def run(handle, inputs):
    with torch.no_grad():
        return logits(handle, inputs)


def graphs(backend):
    return len(backend.reports)


@pytest.fixture
def llama():
    model, inputs = tiny_model(ARCH), tiny_inputs(ARCH)
    plans = {keep: build_plan(model, inputs, keep=keep) for keep in (0.5, 0.7)}
    refs = {keep: eager(model, plan, inputs) for keep, plan in plans.items()}
    refs[None] = eager(model, None, inputs)
    assert (refs[0.5] - refs[0.7]).abs().max() > 1e-2  # the scenarios can tell the plans apart
    return model, inputs, plans, refs


@pytest.mark.parametrize("compiler", COMPILERS)
def test_budget_sweep_detach_and_reattach(compiler, llama):
    model, inputs, plans, refs = llama
    backend = RanaBackend(compiler=compiler)
    ranapass.attach(model, plans[0.5])
    first = torch.compile(model, backend=backend)
    torch.testing.assert_close(run(first, inputs), refs[0.5], **FP32)

    ranapass.attach(model, plans[0.7])
    second = torch.compile(model, backend=backend)
    torch.testing.assert_close(run(second, inputs), refs[0.7], **FP32)
    torch.testing.assert_close(run(first, inputs), refs[0.7], **FP32)  # the earlier handle follows

    ranapass.detach(model)
    torch.testing.assert_close(run(first, inputs), refs[None], **FP32)
    torch.testing.assert_close(run(second, inputs), refs[None], **FP32)

    ranapass.attach(model, plans[0.5])
    torch.testing.assert_close(run(second, inputs), refs[0.5], **FP32)
    torch.testing.assert_close(run(first, inputs), refs[0.5], **FP32)


@pytest.mark.parametrize("compiler", COMPILERS)
def test_unchanged_attachment_does_not_recompile(compiler, llama):
    model, inputs, plans, refs = llama
    backend = RanaBackend(compiler=compiler)
    ranapass.attach(model, plans[0.5])
    handle = torch.compile(model, backend=backend)
    run(handle, inputs)
    compiled = graphs(backend)
    for _ in range(3):
        torch.testing.assert_close(run(handle, inputs), refs[0.5], **FP32)
    torch.testing.assert_close(run(torch.compile(model, backend=backend), inputs), refs[0.5], **FP32)
    assert graphs(backend) == compiled
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiled

    ranapass.attach(model, plans[0.7])
    run(handle, inputs)
    assert graphs(backend) == compiled + 1  # one recompile per change, then none
    run(handle, inputs)
    assert graphs(backend) == compiled + 1


@pytest.mark.parametrize("compiler", COMPILERS)
def test_two_models_two_plans_one_backend(compiler, llama):
    model, inputs, plans, refs = llama
    other = tiny_model(ARCH, seed=3)
    other_plan = build_plan(other, inputs, keep=0.5)
    other_ref = eager(other, other_plan, inputs)
    backend = RanaBackend(compiler=compiler)
    ranapass.attach(model, plans[0.5])
    ranapass.attach(other, other_plan)
    handle, other_handle = torch.compile(model, backend=backend), torch.compile(other, backend=backend)
    for _ in range(2):
        torch.testing.assert_close(run(handle, inputs), refs[0.5], **FP32)
        torch.testing.assert_close(run(other_handle, inputs), other_ref, **FP32)
    compiled = graphs(backend)
    ranapass.detach(other)  # changes only the other model's answer
    torch.testing.assert_close(run(other_handle, inputs), eager(other, None, inputs), **FP32)
    torch.testing.assert_close(run(handle, inputs), refs[0.5], **FP32)
    assert graphs(backend) <= compiled + 2


@pytest.mark.parametrize("compiler", COMPILERS)
def test_older_handle_after_compiler_reset(compiler, llama):
    model, inputs, plans, refs = llama
    backend = RanaBackend(compiler=compiler)
    ranapass.attach(model, plans[0.5])
    first = torch.compile(model, backend=backend)
    run(first, inputs)
    ranapass.attach(model, plans[0.7])
    second = torch.compile(model, backend=backend)
    run(second, inputs)
    torch.compiler.reset()
    torch.testing.assert_close(run(first, inputs), refs[0.7], **FP32)
    torch.testing.assert_close(run(second, inputs), refs[0.7], **FP32)


def test_compiled_before_attaching_follows_the_attachment(llama):
    model, inputs, plans, refs = llama
    backend = RanaBackend(compiler="aot_eager")
    handle = torch.compile(model, backend=backend)
    torch.testing.assert_close(run(handle, inputs), refs[None], **FP32)
    ranapass.attach(model, plans[0.7])
    torch.testing.assert_close(run(handle, inputs), refs[0.7], **FP32)


def test_more_changes_than_the_recompile_limit():
    """Replaced attachments drop their cache entries, so Dynamo never reaches its limit and falls back to
    running the frame eagerly (with dense weights)."""
    model, inputs = tiny_model("mlp"), tiny_inputs("mlp")
    backend = RanaBackend(compiler="aot_eager")
    handle = torch.compile(model, backend=backend)
    for i in range(torch._dynamo.config.recompile_limit + 3):
        plan = build_plan(model, inputs, keep=0.3 + 0.05 * i)
        ranapass.attach(model, plan)
        torch.testing.assert_close(run(handle, inputs), eager(model, plan, inputs), **FP32)
    assert graphs(backend) == torch._dynamo.config.recompile_limit + 3
