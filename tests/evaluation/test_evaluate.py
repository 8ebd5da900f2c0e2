"""Perplexity under the evaluation protocol, and dense FLOP accounting."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from ranapass.cost_model import dense_flops, per_token_at
from ranapass.cost_model import flops
from ranapass.evaluate import EVAL_NUM_WINDOWS, EVAL_WINDOW, perplexity, protocol

from conftest import make_tiny_llama


class ConstantLogits(torch.nn.Module):
    """Logits all equal to ``value``: uniform over the vocabulary (or NaN)."""

    def __init__(self, vocab: int, value: float = 0.0, wrap: str = "tensor"):
        super().__init__()
        self.vocab, self.value, self.wrap = vocab, value, wrap
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids):
        logits = torch.full((*ids.shape, self.vocab), self.value) + 0 * self.dummy
        return (logits,) if self.wrap == "tuple" else logits


@pytest.mark.parametrize("wrap", ["tensor", "tuple"])
def test_uniform_model_has_perplexity_vocab_size(wrap):
    windows = torch.randint(0, 50, (5, 9), generator=torch.Generator().manual_seed(0))
    result = perplexity(ConstantLogits(50, wrap=wrap), windows, batch_size=2, progress=False)
    assert result.tokens == 5 * 8  # every window scored on window - 1 predictions
    assert result.nll == pytest.approx(math.log(50), rel=1e-6)
    assert result.ppl == pytest.approx(50, rel=1e-5)


def test_matches_hugging_face_loss_and_ignores_batch_size():
    model = make_tiny_llama(300)
    windows = torch.randint(0, 300, (6, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # HF's loss is the mean NLL of one window's window-1 predictions
        expected = sum(float(model(w[None], labels=w[None]).loss) for w in windows) / len(windows)
    for batch_size in (1, 4, 8):
        result = perplexity(model, windows, batch_size=batch_size, progress=False)
        assert result.nll == pytest.approx(expected, rel=1e-5), batch_size
        assert result.ppl == pytest.approx(math.exp(expected), rel=1e-5)


def test_window_nll_in_window_order():
    model = make_tiny_llama(300)
    windows = torch.randint(0, 300, (5, 16), generator=torch.Generator().manual_seed(2))
    result = perplexity(model, windows, batch_size=2, progress=False)
    with torch.no_grad():
        expected = [float(model(w[None], labels=w[None]).loss) for w in windows]
    assert result.window_nll == pytest.approx(expected, rel=1e-5)
    assert sum(result.window_nll) / len(windows) == pytest.approx(result.nll, rel=1e-12)


def test_nan_logits_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="ranapass.evaluate"):
        result = perplexity(ConstantLogits(10, float("nan")), torch.zeros(2, 4, dtype=torch.long), progress=False)
    assert math.isnan(result.ppl) and "non-finite" in caplog.text


@pytest.mark.parametrize("shape,batch_size,match", [((4,), 1, "must be"), ((2, 1), 1, "window >= 2"),
                                                    ((2, 4), 0, "batch_size")])
def test_bad_arguments(shape, batch_size, match):
    with pytest.raises(ValueError, match=match):
        perplexity(ConstantLogits(10), torch.zeros(shape, dtype=torch.long), batch_size=batch_size)


def test_protocol_line_names_the_counts():
    line = protocol()
    assert f"{EVAL_NUM_WINDOWS} non-overlapping windows of {EVAL_WINDOW} tokens" in line
    assert f"{EVAL_NUM_WINDOWS * (EVAL_WINDOW - 1)} tokens" in line


# ---------------------------------------------------------------------------------------------
# FLOPs


@pytest.mark.parametrize("tie", [False, True])
def test_dense_flops_of_a_llama(tie):
    model = make_tiny_llama(300, tie=tie)  # hidden 32, MLP 48, 2 layers, 4 heads of 8, 2 KV heads
    kv = 2 * 8
    per_layer = 2 * (32 * 32 + kv * 32 + kv * 32 + 32 * 32 + 48 * 32 + 48 * 32 + 32 * 48)
    f = dense_flops(model)
    assert sympy_equal(f["block_linears"], flops.T * 2 * per_layer)
    assert sympy_equal(f["lm_head"], flops.T * 2 * 300 * 32)
    assert sympy_equal(f["attention"], flops.T * flops.S * 2 * 4 * 4 * 8)
    assert sympy_equal(f["total"], f["block_linears"] + f["lm_head"] + f["attention"])
    at = per_token_at(f, seq_len=16)
    assert at["attention"] == 2 * 4 * 4 * 8 * 16
    assert at["total"] == 2 * per_layer + 2 * 300 * 32 + 2 * 4 * 4 * 8 * 16


def test_dense_flops_of_a_plain_module():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    f = per_token_at(dense_flops(model), seq_len=1)
    assert f == {"block_linears": 2 * (8 * 16 + 16 * 4), "lm_head": 0.0, "attention": 0.0,
                 "total": 2 * (8 * 16 + 16 * 4)}


def sympy_equal(a, b) -> bool:
    return (a - b).simplify() == 0


# ---------------------------------------------------------------------------------------------
# The real model


@pytest.mark.slow
def test_smollm2_dense_perplexity_is_reproducible(smollm2):
    from ranapass.data import evaluation_windows

    model, tokenizer = smollm2
    windows = evaluation_windows(tokenizer, num_windows=2)
    assert windows.shape == (2, EVAL_WINDOW)
    first = perplexity(model, windows, batch_size=2, progress=False)
    second = perplexity(model, windows, batch_size=2, progress=False)
    assert first == second  # bit-identical, run to run
    assert first.tokens == 2 * (EVAL_WINDOW - 1)
    assert 5 < first.ppl < 60


@pytest.mark.slow
def test_smollm2_dense_flops(smollm2):
    f = per_token_at(dense_flops(smollm2[0]), seq_len=512)
    assert f["block_linears"] == 30 * 2 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 1536 * 576)  # 212.3 M
    assert f["lm_head"] == 2 * 49152 * 576
    assert f["attention"] == 30 * 4 * 512 * 9 * 64
