"""The ``generate`` command: dense and adapted completions through the compiled generator, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

import ranapass
from ranapass.cli import main

CALIB = ["--calib-windows", "16", "--calib-window-len", "32", "--error-weighting", "relative"]
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def saved_plan(tmp_path_factory, tiny_llama_dir, text_dir_module):
    """A plan for the tiny Llama at budget 0.6, saved by the ``plan`` command."""
    out = tmp_path_factory.mktemp("plan")
    assert main(["plan", "--model", str(tiny_llama_dir), "--text", str(text_dir_module), *CALIB, "--no-cache",
                 "--budget", "0.6", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def text_dir_module(tmp_path_factory):
    from conftest import synthetic_text

    path = tmp_path_factory.mktemp("text")
    for i in range(3):
        (path / f"{i}.txt").write_text(synthetic_text(40, seed=i), encoding="utf-8")
    return path


def eager_completion(model_dir, plan_dir, new: int) -> list[int]:
    """Greedy completion of PROMPT by the eager model, with the plan run through its adapters when given."""
    model, tokenizer = ranapass.load_model(str(model_dir))
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    kwargs = dict(max_new_tokens=new, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.eos_token_id)
    with torch.no_grad():
        if plan_dir is None:
            return model.generate(ids, **kwargs)[0, ids.shape[1]:].tolist()
        with ranapass.attach(model, ranapass.Plan.load(plan_dir)).eager():
            return model.generate(ids, **kwargs)[0, ids.shape[1]:].tolist()


def test_json_gives_both_completions_equal_to_eager_generation(capsys, tiny_llama_dir, saved_plan):
    assert main(["generate", PROMPT, "--model", str(tiny_llama_dir), "--plan", str(saved_plan),
                 "--max-new-tokens", "6", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)  # exactly one JSON object on stdout
    assert (rep["device"], rep["dtype"], rep["compiler"], rep["prompt"]) == ("cpu", "float32", "inductor", PROMPT)
    assert rep["plan"]["source"] == str(saved_plan) and 0 < rep["plan"]["units_adapted"] <= rep["plan"]["units"]
    tokenizer = ranapass.load_model(str(tiny_llama_dir))[1]
    for label, plan in (("dense", None), ("adapted", saved_plan)):
        r = rep[label]
        expected = eager_completion(tiny_llama_dir, plan, 6)
        assert r["completion"] == tokenizer.decode(expected, skip_special_tokens=True)
        assert r["new_tokens"] == len(expected) and r["tokens_per_s"] > 0 and r["compile_seconds"] > 0
        assert r["graphs"] == {"prefill": 1, "decode": 1}
    assert rep["decode_speedup"] > 0


def test_text_output_and_budget_from_the_profile(capsys, tiny_llama_dir, text_dir_module, isolated_cache):
    assert main(["generate", PROMPT, "--model", str(tiny_llama_dir), "--text", str(text_dir_module), *CALIB,
                 "--budget", "0.7", "--max-new-tokens", "3", "--device", "cpu", "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "plan at budget 0.7" in out and "--- dense:" in out and "--- adapted:" in out
    assert "decode tok/s" in out and "as fast as dense" in out


@pytest.mark.parametrize("argv, message", [
    (["--budget", "0.5", "--plan", "somewhere"], "--budget or --plan, not both"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--device", "nowhere"], "is not a device"),
])
def test_mistakes_are_clear_errors(capsys, tiny_llama_dir, argv, message):
    assert main(["generate", PROMPT, "--model", str(tiny_llama_dir), *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "ranapass generate: error:" in captured.err and message in captured.err


def test_cuda_without_a_gpu_and_a_plan_for_other_weights_are_refused(capsys, tmp_path, tiny_llama_dir,
                                                                     tiny_tokenizer, saved_plan):
    if not torch.cuda.is_available():
        assert main(["generate", PROMPT, "--model", str(tiny_llama_dir), "--device", "cuda", "--json"]) == 2
        assert "no CUDA device" in json.loads(capsys.readouterr().out)["error"]
    from conftest import make_tiny_llama

    other = tmp_path / "other"
    make_tiny_llama(len(tiny_tokenizer), seed=1).save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    assert main(["generate", PROMPT, "--model", str(other), "--plan", str(saved_plan)]) == 2
    assert "profile this model and plan again" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_generates_on_cpu(capsys, tmp_path, smollm2, smollm2_profile):
    """The real model through the CLI; aot_eager keeps the four compiles (two phases, dense and adapted) short:
    the tiny-model tests above run Inductor, tests/compile runs it on SmolLM2."""
    smollm2_profile.plan(0.56).save(tmp_path / "plan")
    assert main(["generate", "The Python interpreter", "--plan", str(tmp_path / "plan"), "--max-new-tokens", "4",
                 "--device", "cpu", "--compiler", "aot_eager", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["plan"]["units_adapted"] > 0 and rep["dtype"] == "float32" and rep["compiler"] == "aot_eager"
    for label in ("dense", "adapted"):
        assert rep[label]["completion"].strip() and 1 <= rep[label]["new_tokens"] <= 4
