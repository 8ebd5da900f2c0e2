"""Greedy generation through the compiled prefill and decode graphs equals eager generation, adapted or dense,
and Hugging Face's own generate with a static cache and the ranapass backend runs every token adapted."""

from __future__ import annotations

import pytest
import torch
from plans import build_plan, fresh_dynamo, tiny_inputs, tiny_model  # noqa: F401 (fixture)

import ranapass
from ranapass.backend import RanaBackend, unrewritten_units
from ranapass.errors import RanapassError
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


def test_dense_baseline_equals_eager_dense_generation():
    model = tiny_model("LlamaForCausalLM")  # no plan attached: the dense baseline
    gen = CompiledGenerator(model, max_cache_len=32)
    assert not gen.adapted
    ids = tiny_inputs("LlamaForCausalLM", batch=1, length=6, seed=3)
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    progress = []
    assert gen.generate(ids, NEW, progress=progress.append).tolist() == expected.tolist()
    assert gen.compilations == {"prefill": 1, "decode": 1}
    assert progress == list(range(1, NEW + 1))
    timing = gen.last_timing
    assert (timing.batch, timing.prompt_tokens, timing.new_tokens) == (1, 6, NEW)
    assert timing.prefill_seconds > 0 and timing.decode_tokens_per_s > 0
    assert 0 < timing.prefill_launch_seconds <= timing.prefill_seconds


def test_prefill_mode_reaches_the_compiled_prefill():
    """A prefill compiled with ``prefill_mode`` (CUDA graphs on a GPU; Inductor skips them on a CPU) still
    rewrites every unit and generates the eager adapted tokens."""
    model = tiny_model("LlamaForCausalLM")
    attachment = ranapass.attach(model, build_plan(model, tiny_inputs("LlamaForCausalLM")))
    gen = CompiledGenerator(model, max_cache_len=32, prefill_mode="reduce-overhead")
    ids = tiny_inputs("LlamaForCausalLM", batch=1, length=6, seed=4)
    assert gen.generate(ids, NEW)[0, 6:].tolist() == eager_generate(model, attachment, ids)[0, 6:].tolist()
    assert gen.compilations == {"prefill": 1, "decode": 1}


def test_refuses_a_plan_changed_after_construction():
    model = tiny_model("LlamaForCausalLM")
    plan = build_plan(model, tiny_inputs("LlamaForCausalLM"))
    ids = tiny_inputs("LlamaForCausalLM", batch=1, length=5)
    dense = CompiledGenerator(model, max_cache_len=16, backend=RanaBackend(compiler="eager"))
    ranapass.attach(model, plan)
    with pytest.raises(RanapassError, match="plan changed"):
        dense.generate(ids, 2)
    adapted = CompiledGenerator(model, max_cache_len=16, backend=RanaBackend(compiler="eager"))
    ranapass.attach(model, plan)  # the same plan again: still the generator's
    assert adapted.generate(ids, 2).shape == (1, 7)
    ranapass.detach(model)
    with pytest.raises(RanapassError, match="plan changed"):
        adapted.generate(ids, 2)


def test_hugging_face_generate_with_chunked_prefill_runs_every_token_adapted():
    from transformers import CompileConfig

    model = tiny_model("LlamaForCausalLM")
    attachment = ranapass.attach(model, build_plan(model, tiny_inputs("LlamaForCausalLM"), keep=0.2,
                                                   rank_fraction=0.5))
    ids = tiny_inputs("LlamaForCausalLM", batch=1, length=9, seed=5)
    expected = eager_generate(model, attachment, ids)
    with torch.no_grad():
        dense = model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    assert dense.tolist() != expected.tolist()  # the plan changes the tokens: the comparison below means something

    config = CompileConfig(backend=ranapass.rana_backend, fullgraph=True)
    config._compile_all_devices = True  # generate compiles nothing on a CPU without it
    before = len(ranapass.rana_backend.reports)

    def hf_generate(**kwargs):
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                  cache_implementation="static", compile_config=config, **kwargs)

    # Without chunked prefill only the decode step is compiled: the prefill runs eagerly and dense.
    hf_generate()
    assert len(ranapass.rana_backend.reports) == before + 1
    # With it, the prefill goes through the compiled call too: every token is adapted.
    assert hf_generate(prefill_chunk_size=ids.shape[1]).tolist() == expected.tolist()
    reports = ranapass.rana_backend.reports[before:]
    assert len(reports) == 2 and unrewritten_units(model, reports[1:]) == []
    assert all(r.rewritten == len(attachment.plan.adapted) for r in reports)
