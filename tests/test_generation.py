"""Greedy generation through the compiled prefill and decode graphs equals eager adapted generation."""

from __future__ import annotations

import pytest
import torch
from plans import build_plan, fresh_dynamo, tiny_inputs, tiny_model  # noqa: F401 (fixture)

import ranapass
from ranapass.backend import RanaBackend
from ranapass.fx_pass import RewriteError
from ranapass.generation import CompiledGenerator

pytestmark = pytest.mark.usefixtures("fresh_dynamo")
NEW = 8


def eager_generate(model, attachment, ids, new=NEW):
    with torch.no_grad(), attachment.eager():
        return model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "GPTNeoXForCausalLM"])
def test_tokens_equal_eager_adapted_generation(arch):
    model = tiny_model(arch)
    attachment = ranapass.attach(model, build_plan(model, tiny_inputs(arch)))
    gen = CompiledGenerator(model, max_cache_len=48)
    lengths = (5, 9, 17) if arch == "LlamaForCausalLM" else (7,)
    for length in lengths:
        ids = tiny_inputs(arch, batch=1, length=length, seed=length)
        out = gen.generate(ids, NEW)
        assert out.shape == (1, length + NEW)
        assert out[0, length:].tolist() == eager_generate(model, attachment, ids)[0, length:].tolist()
    assert gen.compilations == {"prefill": min(len(lengths), 2), "decode": 1}


def test_eos_stops_generation_and_pads():
    model = tiny_model("LlamaForCausalLM")
    ranapass.attach(model, build_plan(model, tiny_inputs("LlamaForCausalLM")))
    # The stopping logic does not depend on Inductor: skip its compile time.
    gen = CompiledGenerator(model, max_cache_len=32, batch_size=2, backend=RanaBackend(compiler="aot_eager"))
    ids = tiny_inputs("LlamaForCausalLM", batch=2, length=6)
    full = gen.generate(ids, NEW)[:, 6:]
    eos = int(full[0, 2])
    out = gen.generate(ids, NEW, eos_token_id=eos)[:, 6:]

    ends = [int((row == eos).nonzero()[0]) + 1 if (row == eos).any() else NEW for row in full]
    assert out.shape[1] == max(ends)
    for row, new, end in zip(full, out, ends):
        assert torch.equal(new[:end], row[:end]) and bool((new[end:] == eos).all())


def test_refuses_to_generate_with_dense_linears():
    model = tiny_model("LlamaForCausalLM")
    ranapass.attach(model, build_plan(model, tiny_inputs("LlamaForCausalLM")))
    model.to(torch.float64)  # the bound adapters are now stale: the pass leaves every linear dense
    gen = CompiledGenerator(model, max_cache_len=32, backend=RanaBackend(compiler="eager"))
    with pytest.raises(RewriteError, match="prefill step left 8 adapted unit"):
        gen.generate(tiny_inputs("LlamaForCausalLM", batch=1, length=5), 2)


def test_bad_requests_are_rejected():
    model = tiny_model("LlamaForCausalLM")
    ranapass.attach(model, build_plan(model, tiny_inputs("LlamaForCausalLM")))
    gen = CompiledGenerator(model, max_cache_len=16)
    with pytest.raises(ValueError, match="batch size 1"):
        gen.generate(tiny_inputs("LlamaForCausalLM", batch=2, length=4), 2)
    with pytest.raises(ValueError, match="max_cache_len 16"):
        gen.generate(tiny_inputs("LlamaForCausalLM", batch=1, length=10), 7)
