"""The method end to end on the real SmolLM2 (slow): profile, plan, eager adapted evaluation, measured FLOPs.

One small session profile (``smollm2_profile``: 12 windows of 256 tokens) serves every test; the README's
figures come from the full protocol (``ranapass eval``), these tests guard the same claims at CI size.
"""

from __future__ import annotations

import pytest
import torch

from ranapass.attach import temporarily_attached
from ranapass.data import evaluation_windows
from ranapass.evaluate import adapted_perplexity, perplexity

pytestmark = pytest.mark.slow


def test_budget_one_reproduces_dense_logits(smollm2, smollm2_profile):
    model, tokenizer = smollm2
    plan = smollm2_profile.plan(1.0)
    x = evaluation_windows(tokenizer, num_windows=1, window=128)
    with torch.no_grad():
        dense = model(x).logits
        with temporarily_attached(model, plan):
            adapted = model(x).logits
    torch.testing.assert_close(adapted, dense, rtol=1e-4, atol=1e-4)


def test_global_beats_uniform_at_the_same_measured_flops(smollm2, smollm2_profile):
    model, tokenizer = smollm2
    windows = evaluation_windows(tokenizer, num_windows=4, window=256)
    dense = perplexity(model, windows, progress=False).ppl
    budget = 0.56
    ours = adapted_perplexity(model, smollm2_profile.plan(budget), windows, progress=False)
    uniform = adapted_perplexity(model, smollm2_profile.plan(budget, allocation="uniform"), windows,
                                 progress=False)
    # thresholds are fitted on two held-out calibration windows: the measured ratio lands near the budget
    assert ours.flop_ratio == pytest.approx(budget, abs=0.02)
    assert uniform.flop_ratio == pytest.approx(budget, abs=0.02)
    assert dense < ours.perplexity.ppl < 1.35 * dense
    assert ours.perplexity.ppl < uniform.perplexity.ppl
