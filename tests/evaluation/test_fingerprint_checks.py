"""Every entry point that takes a plan refuses one made for other weights, before any forward pass."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_llama
from plans import build_plan

import ranapass
from ranapass.attach import attachment_of
from ranapass.cli import main
from ranapass.compiled_eval import compare_compiled
from ranapass.plan import PlanMismatchError

VOCAB = 64


@pytest.fixture
def foreign_plan():
    """A plan made for another tiny Llama (other random weights, same architecture)."""
    other = make_tiny_llama(VOCAB, seed=1)
    return build_plan(other, torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0)))


@pytest.fixture
def no_forward(monkeypatch):
    """Any perplexity pass fails the test: the refusal must come before the expensive work."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a perplexity pass ran before the plan was checked")
    for module in ("ranapass.evaluate", "ranapass.compiled_eval", "ranapass.cli.eval"):
        monkeypatch.setattr(f"{module}.perplexity", forbidden)


def test_adapted_perplexity_refuses_a_foreign_plan(foreign_plan, no_forward):
    model = make_tiny_llama(VOCAB)
    with pytest.raises(PlanMismatchError, match="profile this model and plan again"):
        ranapass.adapted_perplexity(model, foreign_plan, torch.zeros(2, 8, dtype=torch.long), progress=False)
    assert attachment_of(model) is None


def test_compare_compiled_refuses_a_foreign_plan(foreign_plan, no_forward):
    with pytest.raises(PlanMismatchError):
        compare_compiled(make_tiny_llama(VOCAB), foreign_plan, torch.zeros(2, 8, dtype=torch.long), progress=False)


def test_adapted_perplexity_accepts_its_own_plan():
    model = make_tiny_llama(VOCAB)
    plan = build_plan(model, torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0)))
    result = ranapass.adapted_perplexity(model, plan, torch.randint(0, VOCAB, (2, 8)), progress=False)
    assert 0 < result.flop_ratio < 1


@pytest.mark.parametrize("json_flag", [False, True])
def test_eval_cli_refuses_a_foreign_plan_before_the_dense_pass(json_flag, capsys, tmp_path, tiny_llama_dir,
                                                               tiny_tokenizer, text_dir, no_forward):
    other = make_tiny_llama(len(tiny_tokenizer), seed=1)
    build_plan(other, torch.randint(0, len(tiny_tokenizer), (2, 12))).save(tmp_path / "plan")
    argv = ["eval", "--model", str(tiny_llama_dir), "--text", str(text_dir), "--windows", "2", "--window-len", "8",
            "--plan", str(tmp_path / "plan")]
    assert main(argv + ["--json"] * json_flag) == 2
    captured = capsys.readouterr()
    if json_flag:
        error = json.loads(captured.out)
        assert error["error_type"] == "PlanMismatchError" and "plan was made for weights" in error["error"]
    else:
        assert "ranapass eval: error: plan was made for weights" in captured.err
