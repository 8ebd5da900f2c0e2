"""Bad input gets one clear line before any expensive work: exit 2 in the CLI, an error object with --json."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from ranapass.cli import main
from ranapass.errors import RanapassError
from plan_damage import drop_key, drop_tensor, resave, swap_kinds
from save_child import tiny_lora, tiny_plan
from tiny_models import tiny_llama, token_windows


def _run(argv, capsys, json_flag=False) -> str:
    """Run the CLI, expect exit 2 and one error line (or one JSON error object); return the message."""
    assert main(argv + ["--json"] * json_flag) == 2
    out = capsys.readouterr()
    if json_flag:
        return json.loads(out.out)["error"]
    errors = [line for line in out.err.splitlines() if "error:" in line]  # progress bars may come before
    assert out.out == "" and len(errors) == 1 and "Traceback" not in out.err
    return errors[0]


@pytest.fixture
def no_expensive_work(monkeypatch):
    """Fail the test if a command loads a model (the start of any expensive work)."""
    def boom(*args, **kwargs):
        raise AssertionError("expensive work started before the arguments were checked")
    for module in ("_shared", "lora_compress"):  # every command loads its model through one of these
        monkeypatch.setattr(f"ranapass.cli.{module}.load_model", boom)


def _truncate_json(folder):
    (folder / "plan.json").write_text((folder / "plan.json").read_text()[:100])


def _truncate_tensors(folder):
    data = (folder / "tensors.safetensors").read_bytes()
    (folder / "tensors.safetensors").write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage, message", [
    (None, "holds no plan.json"),
    (_truncate_json, "plan.json has .* bytes, its manifest records"),
    (_truncate_tensors, "tensors.safetensors has .* bytes, its manifest records"),
    (lambda f: resave(f, drop_tensor), "the JSON and the tensors do not match"),
    (lambda f: resave(f, drop_key), "lacks 'in_features'"),
    (lambda f: resave(f, swap_kinds), "the JSON and the tensors do not match"),
])
@pytest.mark.parametrize("json_flag", [False, True])
def test_bad_plan_fails_before_the_model_loads(damage, message, json_flag, tmp_path, capsys, no_expensive_work):
    folder = tmp_path / "plan"
    if damage is not None:
        tiny_plan(0).save(folder)
        damage(folder)
    for command in ("eval", "diff"):
        text = _run([command, "--plan", str(folder)], capsys, json_flag)
        assert str(folder) in text and re.search(message, text)


@pytest.mark.parametrize("argv, message", [
    (["eval", "--budget", "0"], "--budget budget must be in"),
    (["plan", "--budget", "1.5"], "--budget budget must be in"),
    (["plan", "--kinds", "rank,bogus"], "unknown candidate kind 'bogus'"),
    (["plan", "--error-exponent", "0"], "error_exponent must be a positive number"),
    (["eval", "--windows", "0"], "--windows must be at least 1"),
    (["profile", "--calib-window-len", "1"], "--calib-window-len must be at least 2"),
])
def test_bad_arguments_fail_before_the_model_loads(argv, message, capsys, no_expensive_work):
    assert message in _run(argv, capsys)


def test_lora_keep_zero_fails_before_calibration(tmp_path, capsys, no_expensive_work):
    tiny_lora(0).save(tmp_path / "lora")
    assert "--keep must be in (0, 1], got 0.0" in _run(
        ["lora-compress", str(tmp_path / "lora"), "--keep", "0", "--error", "fisher", "--model", "x"], capsys)


def test_truncated_lora_adapter_is_one_line(tmp_path, capsys):
    tiny_lora(0).save(tmp_path / "lora")
    weights = tmp_path / "lora" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-50])
    assert "adapter_model.safetensors has" in _run(["lora-compress", str(tmp_path / "lora")], capsys, True)


def test_unknown_model_fails_fast_without_network(monkeypatch, capsys):
    import ranapass.models

    monkeypatch.setattr(ranapass.models, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    assert "the Hub cannot be reached" in _run(["eval", "--model", "nobody/no-such-model"], capsys)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "HF_HUB_OFFLINE is set" in _run(["eval", "--model", "nobody/no-such-model"], capsys)


def test_cache_that_is_a_file_names_the_fixes(tmp_path, monkeypatch, capsys, tiny_llama_dir, text_dir):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("RANAPASS_CACHE", str(tmp_path / "file"))
    argv = ["plan", "--model", str(tiny_llama_dir), "--text", str(text_dir), "--calib-windows", "6",
            "--calib-window-len", "16", "--budget", "0.9"]
    text = _run(argv, capsys)
    assert "is not a folder" in text and "RANAPASS_CACHE" in text and "--no-cache" in text
    assert main(argv + ["--no-cache"]) == 0  # --no-cache skips the unusable profile cache


def test_read_only_cache_names_the_fixes(tmp_path, monkeypatch):
    import ranapass.cache

    monkeypatch.setenv("RANAPASS_CACHE", str(tmp_path))
    monkeypatch.setattr(ranapass.cache.os, "access", lambda path, mode: False)  # root ignores chmod
    with pytest.raises(RanapassError, match="is read-only; set RANAPASS_CACHE to a writable folder"):
        ranapass.cache.cache_dir("profiles")


# ------------------------------------------------------------------------------------------- API
@pytest.fixture(scope="module")
def tiny():
    from ranapass.profiling import ProfileOptions, profile

    model = tiny_llama()
    return model, profile(model, token_windows(8, length=32), cache=False,
                          options=ProfileOptions(sample_tokens=256, holdout_windows=2, gradient_windows=2))


@pytest.mark.parametrize("budget", [np.float32(0.5), torch.tensor(0.5), 1])
def test_any_real_number_is_a_budget(budget, tiny):
    assert tiny[1].plan(budget, fit=False).budget == float(budget)


def test_a_bool_is_not_a_budget_and_one_kind_is_a_kind(tiny):
    with pytest.raises(RanapassError, match="not a number"):
        tiny[1].plan(True)
    assert {u.kind for u in tiny[1].plan(0.8, kinds="rank", fit=False).adapted} <= {"rank"}


@pytest.mark.parametrize("ids, message", [
    (token_windows(2, length=8).float(), "must be integer token ids"),
    (token_windows(2, length=8) - 300, "negative token id"),
    (token_windows(2, length=8) + 256, "beyond the model's vocabulary of 256"),
])
def test_bad_token_ids_are_refused_up_front(ids, message, tiny):
    from ranapass.evaluate import perplexity
    from ranapass.generation import CompiledGenerator
    from ranapass.profiling import profile

    model = tiny[0]
    with pytest.raises(RanapassError, match=f"evaluation windows .*{message}"):
        perplexity(model, ids, progress=False)
    with pytest.raises(RanapassError, match=message):
        profile(model, ids, cache=False)
    with pytest.raises(RanapassError, match=message):
        CompiledGenerator(model, max_cache_len=32, batch_size=2).generate(ids, 2)
