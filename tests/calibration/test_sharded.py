"""Models loaded through accelerate with part of them offloaded: profiling and planning read the weights in place."""

from __future__ import annotations

import pytest
import torch

from ranapass.attach import attach
from ranapass.errors import RanapassError
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


def test_attaching_to_offloaded_layers_is_refused(models):
    dense, sharded, windows = models
    plan = profile(dense, windows, options=OPTIONS, cache=False).plan(0.5, fit=False)
    with pytest.raises(RanapassError, match="offloaded by accelerate"):
        attach(sharded, plan)


def test_a_small_cpu_budget_offloads_to_disk(tiny_llama_dir, tmp_path):
    model, _ = load_model(str(tiny_llama_dir), device_map="auto", max_memory={"cpu": 100_000}, offload_folder=tmp_path)
    assert is_offloaded(model.get_submodule("model.layers.0.mlp.down_proj"))


def test_device_map_arguments_are_checked(tiny_llama_dir):
    with pytest.raises(RanapassError, match="need device_map"):
        load_model(str(tiny_llama_dir), max_memory={"cpu": "1GiB"})
    with pytest.raises(RanapassError, match="either device"):
        load_model(str(tiny_llama_dir), device="meta", device_map="auto")
