"""Loss calibration of the curves (ranapass.loss_calibration) on a tiny random Llama: what it measures,
what it changes, that it persists and that it can be turned off."""

import dataclasses
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ranapass.attach import temporarily_attached
from ranapass.loss_calibration import PROBE_KEPT, LossScale, _probe_index, probe_plan, block_of, role_of
from ranapass.profiling import Profile, ProfileOptions, profile
from tiny_models import tiny_llama, token_windows

OPTIONS = ProfileOptions(sample_tokens=512, holdout_windows=4, gradient_windows=4, loss_probe_kept=(0.5, 0.85))
ONE_LEVEL = dataclasses.replace(OPTIONS, loss_probe_kept=(0.5,))


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def profiles(model):
    data = token_windows(24)
    on = profile(model, data, options=OPTIONS, cache=False)
    off = profile(model, data, options=dataclasses.replace(OPTIONS, loss_calibration=False), cache=False)
    return on, off


@pytest.fixture(scope="module")
def one_level(model):
    return profile(model, token_windows(24), options=ONE_LEVEL, cache=False)


def _units(prof):
    return {u.name: u for u in prof.units}


def _kl(model, holdout, plan):
    with torch.no_grad():
        dense = F.log_softmax(model(holdout).logits.float(), -1)
        with temporarily_attached(model, plan):
            adapted = F.log_softmax(model(holdout).logits.float(), -1)
    return float((dense.exp() * (dense - adapted)).sum(-1).mean())


def test_block_and_role_of_a_path():
    assert block_of("model.layers.12.mlp.down_proj") == "model.layers.12"
    assert role_of("model.layers.12.mlp.down_proj") == "model.layers.*.mlp.down_proj"
    assert block_of("blocks.3.experts.7.w1") == "blocks.3"
    assert role_of("blocks.3.experts.7.w1") == "blocks.*.experts.*.w1"
    assert block_of("lm_head") == "lm_head" and role_of("lm_head") == "lm_head"
    assert role_of("h.0.attn.c_attn") == "h.*.attn.c_attn" and block_of("x2.proj") == "x2.proj"


def test_one_probe_level_scales_every_curve_of_a_unit_by_one_positive_factor(profiles, one_level):
    on, off = _units(one_level), _units(profiles[1])
    assert on.keys() == off.keys()
    factors = {}
    for name, unit in on.items():
        ratios = []
        for kind, curve in unit.curves.items():
            ref = off[name].curves[kind]
            np.testing.assert_array_equal(curve.flops, ref.flops)
            np.testing.assert_array_equal(curve.tau, ref.tau)
            mask = ref.error > 0
            ratios.append(curve.error[mask] / ref.error[mask])
        r = np.concatenate(ratios)
        assert r.min() > 0 and r.max() == pytest.approx(r.min(), rel=1e-9)
        factors[name] = float(r[0])
    assert max(factors.values()) / min(factors.values()) > 1.05  # the calibration did change the ranking
    for site in one_level.sites:
        if site.stacked is not None:  # a stacked unit's factor lies within its members'
            members = [factors[m] for m in site.members]
            assert min(members) * (1 - 1e-9) <= factors[site.stacked.name] <= max(members) * (1 + 1e-9)


def test_with_two_probe_levels_a_candidate_is_scaled_between_them_by_its_flop_fraction(profiles):
    on, off = map(_units, profiles)
    changed = 0
    for name, unit in off.items():
        if "neuron" not in unit.curves or "{" in name:
            continue
        curve = unit.curves["neuron"]
        probes = [_probe_index(unit, k) for k in OPTIONS.loss_probe_kept]
        at = curve.flops[probes] / unit.dense_flops
        mask = curve.error > 0
        ratio = on[name].curves["neuron"].error[mask] / curve.error[mask]
        ends = on[name].curves["neuron"].error[probes] / curve.error[probes]
        assert ratio.min() >= ends.min() * (1 - 1e-9) and ratio.max() <= ends.max() * (1 + 1e-9)
        scale = LossScale(at, ends)
        np.testing.assert_allclose(ratio, scale(curve.flops[mask] / unit.dense_flops), rtol=1e-9)
        changed += abs(ends[1] / ends[0] - 1) > 0.05
    assert changed  # the levels do differ


def test_loss_scale_is_log_linear_between_probes_and_flat_beyond():
    scale = LossScale(np.array([0.5, 0.9]), np.array([1.0, 4.0]))
    np.testing.assert_allclose(scale(np.array([0.1, 0.5, 0.7, 0.9, 1.2])), [1.0, 1.0, 2.0, 4.0, 4.0])


@pytest.mark.parametrize("level", range(len(OPTIONS.loss_probe_kept)))
def test_a_block_probe_predicts_the_measured_kl(model, profiles, level):
    """At each probe level, each block's calibrated errors at the probe points sum to the KL its probe measures."""
    on, off = profiles
    kept = OPTIONS.loss_probe_kept[level]
    units = [u for s in off.sites for u in s.separate]
    calibrated = _units(on)
    for block in ("model.layers.0", "model.layers.1"):
        probed = [u for u in units if block_of(u.name) == block]
        measured = _kl(model, on.holdout, probe_plan(model, probed, kept))
        predicted = sum(float(calibrated[u.name].curves["neuron"].error[_probe_index(u, kept)]) for u in probed)
        assert measured > 0
        assert predicted == pytest.approx(measured, rel=1e-3)


def test_meta_timings_and_off_switch(profiles):
    on, off = profiles
    assert on.meta["loss_calibration"]["probes"] == 2 * (2 + 7)  # two levels of two blocks and seven roles
    assert on.meta["loss_calibration"]["probe_kept"] == list(OPTIONS.loss_probe_kept)
    assert ProfileOptions().loss_probe_kept == PROBE_KEPT == (0.5,)
    assert on.meta["loss_calibration"]["windows"] == OPTIONS.holdout_windows
    assert on.meta["timings"]["loss_calibration"] > 0
    assert off.meta["loss_calibration"] == "off"
    assert "loss_calibration" not in off.meta["timings"]


def test_skipped_without_holdout(model):
    prof = profile(model, token_windows(12), options=dataclasses.replace(OPTIONS, holdout_windows=0), cache=False)
    assert prof.meta["loss_calibration"] == "skipped: no held-out windows"


def test_calibrated_curves_survive_save_and_load(model, profiles, tmp_path):
    on = profiles[0]
    loaded = Profile.load(on.save(tmp_path / "p"), model)
    assert loaded.meta["loss_calibration"] == on.meta["loss_calibration"]
    for a, b in zip(on.units, loaded.units, strict=True):
        for kind in a.curves:
            np.testing.assert_array_equal(a.curves[kind].error, b.curves[kind].error)
    start = time.perf_counter()
    plan = loaded.plan(0.6)
    assert time.perf_counter() - start < 5
    assert [(u.name, u.kind) for u in plan.units] == [(u.name, u.kind) for u in on.plan(0.6).units]


@pytest.mark.parametrize("budget", [0.4, 0.6, 0.8])
def test_a_higher_error_exponent_spreads_the_error(profiles, budget):
    """The larger the exponent, the smaller the largest unit error (and, at 2, the summed squares)."""
    on = profiles[0]
    plans = {e: on.plan(budget, error_exponent=e, fit=False) for e in (0.5, 1.0, 2.0)}
    errors = {e: np.array([u.predicted_error for u in p.units]) for e, p in plans.items()}
    assert errors[2.0].max() <= errors[1.0].max() * 1.01 <= errors[0.5].max() * 1.02
    assert np.square(errors[2.0]).sum() <= np.square(errors[1.0]).sum() * 1.01
    assert plans[2.0].meta["error_exponent"] == 2.0
    assert all(p.expected_ratio() <= budget + 1e-9 for p in plans.values())


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), True, "2"])
def test_error_exponent_must_be_positive(profiles, bad):
    with pytest.raises(ValueError, match="error_exponent"):
        profiles[0].plan(0.6, error_exponent=bad)


@pytest.mark.parametrize("bad", [(), (0.0,), (1.0,), (0.5, 1.2), (True,), ("0.5",)])
def test_probe_levels_must_be_kept_fractions(bad):
    with pytest.raises(ValueError, match="loss_probe_kept"):
        ProfileOptions(loss_probe_kept=bad)
