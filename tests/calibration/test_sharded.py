"""Models dispatched by accelerate, part of them offloaded: profile, plan, attach and compile as the whole model."""

from __future__ import annotations

import pytest
import torch

from ranapass.attach import attach, detach
from ranapass.backend import RanaBackend
from ranapass.errors import RanapassError
from ranapass.fx_pass import RewriteError
from ranapass.fingerprint import weights_fingerprint
from ranapass.models import load_model
from ranapass.offload import is_offloaded
from ranapass.profiling import ProfileOptions, profile
from tiny_models import token_windows

pytest.importorskip("accelerate")

OPTIONS = ProfileOptions(batch_size=2, sample_tokens=64, gradient_windows=3)


@pytest.fixture(scope="module")
def models(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama loaded whole, and loaded with its second layer offloaded to disk."""
    dense, tokenizer = load_model(str(tiny_llama_dir))
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}
    sharded, _ = load_model(str(tiny_llama_dir), device_map=device_map, offload_folder=tmp_path_factory.mktemp("offload"))
    return dense, sharded, token_windows(10, 32, vocab=len(tokenizer))


def test_part_of_the_model_is_offloaded(models):
    _, sharded, _ = models
    offloaded = {name for name, m in sharded.named_modules() if isinstance(m, torch.nn.Linear) and is_offloaded(m)}
    assert offloaded and len(offloaded) < sum(isinstance(m, torch.nn.Linear) for m in sharded.modules())


def test_offloaded_model_profiles_and_plans_like_the_whole_one(models):
    dense, sharded, windows = models
    assert weights_fingerprint(sharded) == weights_fingerprint(dense)
    with torch.no_grad():
        assert torch.equal(sharded(windows[:2]).logits, dense(windows[:2]).logits)
    mine, reference = (profile(m, windows, options=OPTIONS, cache=False) for m in (sharded, dense))
    assert [u.name for u in mine.units] == [u.name for u in reference.units]
    for u, v in zip(mine.units, reference.units):
        assert (u.basis is None) == (v.basis is None)
        if u.basis is not None:
            assert torch.equal(u.basis, v.basis)
        for kind in v.curves:
            assert (u.curves[kind].error == v.curves[kind].error).all()
    for budget in (0.5, 0.7):
        a, b = mine.plan(budget, fit=False), reference.plan(budget, fit=False)
        assert [(u.name, u.kind, getattr(u.adapter, "rank", None)) for u in a.units] == \
               [(u.name, u.kind, getattr(u.adapter, "rank", None)) for u in b.units]


@pytest.fixture(scope="module")
def split(tiny_llama_dir):
    """The tiny Llama dispatched by accelerate over one device with hooks on every block (as over several GPUs)."""
    from accelerate import dispatch_model

    model, _ = load_model(str(tiny_llama_dir))
    blocks = ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "model.rotary_emb", "lm_head"]
    return dispatch_model(model, device_map=dict.fromkeys(blocks, "cpu"), force_hooks=True)


@pytest.fixture(scope="module")
def plans(models):
    """The whole model's profile and plan at 0.6 (thresholds fitted), and the offloaded model's."""
    dense, sharded, windows = models
    return [profile(m, windows, options=OPTIONS, cache=False).plan(0.6) for m in (dense, sharded)]


def _units(plan):
    return [(u.name, u.kind, getattr(u.adapter, "rank", None), u.expected_kept,
             None if u.adapter is None else u.adapter.thresholds.tolist()) for u in plan.units]


def test_offloaded_model_fits_the_plan_of_the_whole_one(plans):
    mine, reference = plans
    assert reference.adapted and _units(mine) == _units(reference)


@pytest.mark.parametrize("layout", ["offloaded", "split"])
def test_adapters_run_eagerly_and_compiled_on_a_dispatched_model(models, split, plans, layout):
    dense, sharded, windows = models
    model = sharded if layout == "offloaded" else split
    plan, ids = plans[1], windows[:2]
    with torch.no_grad():
        with attach(dense, plan).eager():
            expected = dense(ids).logits
        attachment = attach(model, plan)
        with attachment.eager():
            eager = model(ids).logits
        assert not torch.allclose(expected, dense(ids).logits, atol=1e-4)  # the adapters change the output
        assert torch.allclose(eager, expected, atol=1e-5)
        assert torch.equal(model(ids).logits, dense(ids).logits)  # accelerate's hooks survive the eager context
        torch._dynamo.reset()
        backend = RanaBackend(compiler="aot_eager")
        with torch._dynamo.config.patch(recompile_limit=64):
            compiled = torch.compile(model, backend=backend)
            for _ in range(2):  # the second call reuses the graphs, each guarded to its own layer
                assert torch.allclose(compiled(ids).logits, expected, atol=1e-5)
    backend.check(model)
    assert sum(r.rewritten for r in backend.reports) == len(plan.adapted)
    detach(model)


def test_graphs_past_the_recompile_limit_are_reported(models, plans):
    dense, sharded, windows = models
    attach(sharded, plans[1])
    torch._dynamo.reset()
    backend = RanaBackend(compiler="aot_eager")
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=2):
        torch.compile(sharded, backend=backend)(windows[:2])
    with pytest.raises(RewriteError, match="never rewritten"):
        backend.check(sharded)
    detach(sharded)


def test_a_small_cpu_budget_offloads_to_disk(tiny_llama_dir, tmp_path):
    model, _ = load_model(str(tiny_llama_dir), device_map="auto", max_memory={"cpu": 100_000}, offload_folder=tmp_path)
    assert is_offloaded(model.get_submodule("model.layers.0.mlp.down_proj"))


def test_device_map_arguments_are_checked(tiny_llama_dir):
    with pytest.raises(RanapassError, match="need device_map"):
        load_model(str(tiny_llama_dir), max_memory={"cpu": "1GiB"})
    with pytest.raises(RanapassError, match="either device"):
        load_model(str(tiny_llama_dir), device="meta", device_map="auto")
