"""The gradient pass's first-order loss change of each neuron threshold, and how the allocator uses it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ranapass
from ranapass import planning
from ranapass.calibrate import CalibrationStats, candidate_linears, collect
from ranapass.candidates import shrunk_first_order
from ranapass.cost_model.curves import KEEP_FRACTIONS, neuron_thresholds
from ranapass.hooks import forward_hooks
from ranapass.profiling import ProfileOptions
from tiny_models import tiny_llama, token_windows


def _summed_loss(model, windows) -> float:
    total = 0.0
    with torch.no_grad():
        for w in windows:
            logits = model(input_ids=w[None]).logits[0, :-1]
            total += float(F.cross_entropy(logits, w[1:], reduction="sum"))
    return total


@pytest.mark.parametrize("member", [0, -1])
def test_first_order_matches_a_finite_difference(member):
    """Scaling the dropped inputs' contribution by (1 - eps) changes the loss by eps * the first-order term."""
    model = tiny_llama().double()
    windows = token_windows(3, length=64)
    linears = candidate_linears(model)
    stats = collect(model, windows, linears=linears, sample_tokens=64, gradient_data=windows)
    site = stats.sites[1]
    name = site.members[member]
    weight = linears[name].weight.detach()
    taus, _ = neuron_thresholds(site.sample, weight)
    k = int(np.flatnonzero(KEEP_FRACTIONS == 0.5)[0])
    col_norm = weight.float().norm(dim=0)
    tau = torch.tensor(taus[k], dtype=torch.float32)

    def loss_at(eps: float) -> float:
        def fwd(module, args, out):
            x = args[0]  # scores in float32, as the thresholds are
            return out - eps * F.linear(torch.where(x.float().abs() * col_norm < tau, x, 0.0), weight)
        with forward_hooks([(linears[name].module, fwd)]):
            return _summed_loss(model, windows)

    eps = 1e-3  # the rotary embedding runs in float32: a smaller step measures its rounding
    slope = (loss_at(eps) - loss_at(-eps)) / (2 * eps) / (3 * 64)
    measured = stats.first_order[name]
    assert measured.dtype == torch.float64 and measured.shape == (len(taus),)
    assert float(measured[k]) == pytest.approx(slope, rel=2e-3)
    assert float(measured[-1]) == 0.0  # the last threshold keeps everything


def test_standard_error_is_that_of_the_per_window_terms():
    """The first-order terms of one window each, from separate passes: their mean is the term and their spread
    over sqrt(windows) its standard error."""
    model = tiny_llama().double()
    windows = token_windows(3, length=64)
    linears = candidate_linears(model)
    stats = collect(model, windows, linears=linears, sample_tokens=64, gradient_data=windows)
    single = [collect(model, windows, linears=linears, sample_tokens=64, gradient_data=windows[i:i + 1])
              for i in range(3)]
    for name, mean in stats.first_order.items():
        per_window = torch.stack([s.first_order[name] for s in single])
        torch.testing.assert_close(mean, per_window.mean(0))
        torch.testing.assert_close(stats.first_order_se[name], per_window.std(0) / 3 ** 0.5, rtol=1e-5, atol=1e-12)
        assert torch.isnan(single[0].first_order_se[name]).all()   # one window: no error estimate


def test_shrinkage_keeps_clear_terms_and_drops_noise():
    stats = CalibrationStats([], {}, 0, 0, first_order={"a": torch.tensor([1.0, 0.1, -2.0, 0.0], dtype=torch.float64)},
                             first_order_se={"a": torch.tensor([0.5, 0.2, 0.0, 0.1], dtype=torch.float64)})
    torch.testing.assert_close(shrunk_first_order(stats, "a"), torch.tensor([0.75, 0.0, -2.0, 0.0], dtype=torch.float64))
    stats.first_order_se["a"] = torch.full((4,), float("nan"), dtype=torch.float64)
    torch.testing.assert_close(shrunk_first_order(stats, "a"), stats.first_order["a"])
    assert shrunk_first_order(stats, "b") is None


def test_profile_curves_carry_the_first_order_term_and_plans_use_it(tmp_path):
    model = tiny_llama()
    windows = token_windows(8, length=64)
    prof = ranapass.profile(model, windows, cache=False, options=ProfileOptions(holdout_windows=2))
    neuron = [u.curves["neuron"] for u in prof.units if "neuron" in u.curves]
    assert neuron and all(np.any(c.first_order) for c in neuron)
    assert all(not np.any(c.first_order) for u in prof.units for k, c in u.curves.items() if k == "rank")
    loaded = ranapass.Profile.load(prof.save(tmp_path / "p"), model)
    for a, b in zip(prof.units, loaded.units):
        for kind in a.curves:
            np.testing.assert_array_equal(a.curves[kind].first_order, b.curves[kind].first_order)
    with_term, without = prof.plan(0.7, fit=False), prof.plan(0.7, fit=False, first_order=False)
    assert with_term.meta["first_order"] and not without.meta["first_order"]
    assert [u.expected_kept for u in with_term.units] != [u.expected_kept for u in without.units]


def test_first_order_term_is_left_out_above_its_loss_bound(monkeypatch):
    model = tiny_llama()
    prof = ranapass.profile(model, token_windows(8, length=64), cache=False, options=ProfileOptions(holdout_windows=2))
    monkeypatch.setattr(planning, "FIRST_ORDER_MAX_KL", 0.0)
    gated, without = prof.plan(0.7, fit=False), prof.plan(0.7, fit=False, first_order=False)
    assert [u.expected_kept for u in gated.units] == [u.expected_kept for u in without.units]
