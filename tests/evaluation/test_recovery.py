"""Output corrections: recovery (``ranapass.recover``) and the bias step (``ranapass.bias_step``) lower the KL
from the dense model, keep the plan's kept counts, leave the model and the input plan as they were, and run on
every path (eager, saved and loaded, compiled); the bias step's gradient is the bias's; malformed corrections
are refused."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from plans import build_plan, fresh_dynamo, tiny_model  # noqa: F401

import ranapass
from ranapass.adapters import GatedMaskAdapterSpec, NeuronAdapterSpec
from ranapass.attach import attachment_of
from ranapass.baselines import teal
from ranapass.bias_step import gradient_and_fisher
from ranapass.data import split_holdout
from ranapass.errors import RanapassError
from ranapass.fingerprint import weights_fingerprint
from ranapass.plan import Plan

VOCAB = 128


def _windows(n: int, length: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _kl(model, plan: Plan, windows: torch.Tensor) -> float:
    dense = F.log_softmax(model(windows).logits.float(), -1)
    with ranapass.attach(model, plan).eager():
        adapted = F.log_softmax(model(windows).logits.float(), -1)
    ranapass.detach(model)
    return float(F.kl_div(adapted, dense, log_target=True, reduction="sum") / windows.numel())


@torch.no_grad()
def _kept(model, plan: Plan, windows: torch.Tensor) -> dict[str, float]:
    with ranapass.attach(model, plan).eager(), ranapass.FlopMeter() as meter:
        model(windows)
    ranapass.detach(model)
    return {u.name: meter.mean_kept(u.name) for u in plan.adapted}


@pytest.fixture(scope="module")
def recovered():
    model = tiny_model("LlamaForCausalLM")
    with torch.no_grad():  # sharper predictions than a random init's near-uniform ones: a KL worth lowering
        model.lm_head.weight.mul_(8)
    train, holdout = _windows(32, 64), _windows(4, 64, seed=1)  # fewer tokens than parameters overfit
    plan = build_plan(model, holdout, keep=0.4, neuron="all")
    fingerprint = weights_fingerprint(model)
    out = ranapass.recover(model, plan, train, holdout, epochs=4, lr=3e-3, progress=False)
    assert weights_fingerprint(model) == fingerprint and all(p.requires_grad for p in model.parameters())
    return model, plan, out, train, holdout


def test_recovery_lowers_the_kl_and_keeps_the_planned_counts(recovered):
    model, plan, out, train, holdout = recovered
    assert all(u.adapter.out_scale is None for u in plan.adapted), "the input plan was modified"
    assert all(u.adapter.out_scale is not None for u in out.adapted)
    assert _kl(model, out, train) < 0.9 * _kl(model, plan, train)
    assert _kl(model, out, _windows(4, 64, seed=2)) < _kl(model, plan, _windows(4, 64, seed=2))
    kept = _kept(model, out, holdout)
    for u in out.adapted:  # fitted on the holdout: each unit keeps its planned count there
        assert kept[u.name] == pytest.approx(u.expected_kept, rel=0.05, abs=0.5)
    history, kept_epoch = out.meta["recovery"]["history"], out.meta["recovery"]["kept_epoch"]
    assert [h["epoch"] for h in history] == [0, 1, 2, 3, 4] and kept_epoch > 0
    assert history[kept_epoch]["holdout_kl"] == min(h["holdout_kl"] for h in history)


def test_recovered_plan_round_trips_and_compiles_to_its_eager_output(recovered, tmp_path, fresh_dynamo):  # noqa: F811
    model, _, out, _, _ = recovered
    loaded = Plan.load(out.save(tmp_path / "plan"))
    for a, b in zip(out.adapted, loaded.adapted):
        assert torch.equal(a.adapter.out_scale, b.adapter.out_scale)
        assert torch.equal(a.adapter.out_bias, b.adapter.out_bias)
    ids = _windows(2, seed=3)
    with torch.no_grad():
        with ranapass.attach(model, loaded).eager():
            eager = model(ids).logits
        compiled = torch.compile(model, backend=ranapass.rana_backend)(ids).logits
    ranapass.detach(model)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_a_teal_plan_keeps_the_counts_it_ran_with_and_its_criterion():
    """A TEAL-style plan's ``expected_kept`` is its dense calibration quantile, not what it keeps once
    earlier units are sparse: recovery refits to the counts the plan kept on the held-out windows."""
    model = tiny_model("LlamaForCausalLM")
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    calibration = _windows(34, 64)
    baseline = teal(model, calibration, holdout_windows=2, sample_tokens=512)
    plan = baseline.plan(0.5)
    train, holdout = split_holdout(calibration, 2)
    assert torch.equal(holdout, baseline.holdout)
    before = _kept(model, plan, holdout)
    out = ranapass.recover(model, plan, train, holdout, epochs=3, lr=3e-3, progress=False)
    assert out.meta["recovery"]["kept_epoch"] > 0
    after = _kept(model, out, holdout)
    for u in out.adapted:
        assert u.expected_kept == before[u.name]
        assert after[u.name] == pytest.approx(before[u.name], rel=0.05, abs=0.5)
        assert torch.equal(u.adapter.thresholds, torch.full_like(u.adapter.thresholds, u.adapter.tau))


def test_the_correction_is_the_output_scale_and_bias():
    w = torch.randn(6, 5)
    scale, bias = torch.rand(6) + 0.5, torch.randn(6)
    spec = NeuronAdapterSpec(("l",), (6,), 5, 0.1, thresholds=torch.full((5,), 0.2))
    fixed = NeuronAdapterSpec(("l",), (6,), 5, 0.1, out_scale=scale, out_bias=bias, thresholds=torch.full((5,), 0.2))
    x = torch.randn(3, 5)
    plain = spec.reference(x, *spec.corrected(spec.operands([w], [None])).values())
    torch.testing.assert_close(fixed.reference(x, *fixed.corrected(fixed.operands([w], [None])).values()),
                               plain * scale + bias)


def test_a_correction_that_lowers_no_held_out_kl_is_not_kept(caplog):
    """An exact plan (everything kept) has no error to recover: the plan comes back without a correction."""
    model = tiny_model("LlamaForCausalLM")
    plan = build_plan(model, _windows(2), keep=1.0, neuron="all")
    out = ranapass.recover(model, plan, _windows(4), _windows(2, seed=1), epochs=2, lr=1e-2, progress=False)
    assert out.meta["recovery"]["kept_epoch"] == 0 and "returned without one" in caplog.text
    assert all(u.adapter.out_scale is None for u in out.adapted)


def test_bad_corrections_are_refused(tmp_path):
    with pytest.raises(ValueError, match="out_scale and out_bias, or neither"):
        NeuronAdapterSpec(("l",), (6,), 5, 0.1, out_scale=torch.ones(6), thresholds=torch.zeros(5))
    with pytest.raises(ValueError, match="out_scale of shape"):
        NeuronAdapterSpec(("l",), (6,), 5, 0.1, out_scale=torch.ones(5), out_bias=torch.zeros(5),
                          thresholds=torch.zeros(5))
    with pytest.raises(ValueError, match="takes no output correction"):
        GatedMaskAdapterSpec(("g", "u"), (4, 4), 5, 0.1, out_scale=torch.ones(8), out_bias=torch.zeros(8),
                             thresholds=torch.zeros(4))
    model = tiny_model("LlamaForCausalLM")
    plan = build_plan(model, _windows(2), keep=0.5, neuron="all")
    with pytest.raises(ValueError, match="token windows"):
        ranapass.recover(model, plan, _windows(2)[0], _windows(2))
    with pytest.raises(ranapass.PlanMismatchError):
        ranapass.recover(tiny_model("LlamaForCausalLM", seed=5), plan, _windows(2), _windows(2))
    unit = plan.adapted[0]
    unit.adapter.out_scale, unit.adapter.out_bias = torch.ones(unit.adapter.out_total), torch.zeros(unit.adapter.out_total)
    folder = plan.save(tmp_path / "plan")
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(folder / "tensors.safetensors"))
    del tensors[f"{plan.units.index(unit)}.out_bias"]
    save_file(tensors, str(folder / "tensors.safetensors"))
    with pytest.raises(RanapassError):
        Plan.load(folder)


@pytest.fixture(scope="module")
def stepped():
    model = tiny_model("LlamaForCausalLM")
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    train, holdout = _windows(32, 64), _windows(4, 64, seed=1)
    plan = build_plan(model, holdout, keep=0.25, neuron="all")  # a held-out KL over bias_step's MIN_PLAN_KL
    fingerprint = weights_fingerprint(model)
    out = ranapass.bias_step(model, plan, train, holdout, progress=False)
    assert weights_fingerprint(model) == fingerprint and all(p.requires_grad for p in model.parameters())
    assert attachment_of(model) is None
    return model, plan, out, train, holdout


def test_the_bias_step_lowers_the_held_out_kl_and_keeps_the_planned_counts(stepped):
    model, plan, out, train, holdout = stepped
    assert all(u.adapter.out_bias is None for u in plan.adapted), "the input plan was modified"
    meta = out.meta["bias_step"]
    assert meta["alpha"] > 0 and min(meta["searched"], key=lambda s: s[1])[0] == meta["alpha"]
    assert meta["searched"][0][0] == 0 and all(b[0] > a[0] for a, b in zip(meta["searched"], meta["searched"][1:]))
    for u in out.adapted:
        assert torch.equal(u.adapter.out_scale, torch.ones(u.adapter.out_total))
        assert u.adapter.out_bias.abs().sum() > 0
    assert _kl(model, out, holdout) < _kl(model, plan, holdout)
    assert _kl(model, out, train) < _kl(model, plan, train)
    kept = _kept(model, out, holdout)
    for u in out.adapted:
        assert kept[u.name] == pytest.approx(u.expected_kept, rel=0.05, abs=0.5)


@pytest.mark.parametrize("arch, neuron", [("LlamaForCausalLM", "all"), ("LlamaForCausalLM", "none"),
                                          ("Qwen2ForCausalLM", "wide"), ("GPTNeoXForCausalLM", "wide")])
def test_the_bias_steps_gradient_is_that_of_a_bias_on_each_output(arch, neuron):
    """``gradient_and_fisher``'s gradient, against autograd through a bias parameter added to every member:
    neuron and rank units, grouped q/k/v and gate/up, linears with biases, a fused qkv projection."""
    model = tiny_model(arch)
    plan = build_plan(model, _windows(2), keep=0.5, neuron=neuron)
    windows = _windows(4, 32, seed=4)
    grad, fisher = gradient_and_fisher(model, ranapass.attach(model, plan), plan, plan.adapted, windows, 2, 0, False)
    ranapass.detach(model)
    biases = {path: torch.zeros(m, requires_grad=True)
              for u in plan.adapted for path, m in zip(u.members, u.out_features)}
    handles = [model.get_submodule(path).register_forward_hook(lambda _m, _a, out, b=b: out + b)
               for path, b in biases.items()]
    with torch.no_grad():
        dense = F.log_softmax(model(windows).logits.float(), -1)
    with ranapass.attach(model, plan).eager():
        adapted = F.log_softmax(model(windows).logits.float(), -1)
    ranapass.detach(model)
    for h in handles:
        h.remove()
    (F.kl_div(adapted, dense, log_target=True, reduction="sum") / windows.numel()).backward()
    for u in plan.adapted:
        expected = torch.cat([biases[path].grad for path in u.members])
        torch.testing.assert_close(grad[u.name], expected, rtol=1e-4, atol=1e-8)
        assert fisher[u.name].shape == expected.shape and (fisher[u.name] >= 0).all() and fisher[u.name].sum() > 0


def test_no_bias_step_for_a_plan_near_the_dense_model(caplog):
    """An exact plan has nothing to correct, and a plan under ``min_plan_kl`` gets no step (and no gradient
    pass); a step that lowers the held-out KL by less than 1% is not kept either."""
    model = tiny_model("LlamaForCausalLM")
    exact = build_plan(model, _windows(2), keep=1.0, neuron="all")
    with caplog.at_level(logging.INFO, logger="ranapass.bias_step"):
        out = ranapass.bias_step(model, exact, _windows(4), _windows(2, seed=1), progress=False)
    assert out.meta["bias_step"]["alpha"] == 0 and len(out.meta["bias_step"]["searched"]) == 1
    assert "no bias step" in caplog.text and all(u.adapter.out_bias is None for u in out.adapted)
    out = ranapass.bias_step(model, exact, _windows(4), _windows(2, seed=1), min_plan_kl=0.0, progress=False)
    assert out.meta["bias_step"]["alpha"] == 0, "rounding under a KL of zero is no gain"
    plan = build_plan(model, _windows(2), keep=0.5, neuron="all")
    out = ranapass.bias_step(model, plan, _windows(4), _windows(2, seed=1), min_plan_kl=0.0, progress=False)
    searched = out.meta["bias_step"]["searched"]
    assert len(searched) > 1
    if min(kl for _, kl in searched) >= 0.99 * searched[0][1]:
        assert out.meta["bias_step"]["alpha"] == 0 and all(u.adapter.out_bias is None for u in out.adapted)
    else:
        assert out.meta["bias_step"]["alpha"] > 0


def test_bad_bias_step_arguments_are_refused():
    model = tiny_model("LlamaForCausalLM")
    plan = build_plan(model, _windows(2), keep=0.5, neuron="all")
    with pytest.raises(ValueError, match="damping"):
        ranapass.bias_step(model, plan, _windows(2), _windows(2), damping=0.0)
    with pytest.raises(ValueError, match="token windows"):
        ranapass.bias_step(model, plan, _windows(2)[0], _windows(2))
    with pytest.raises(ranapass.PlanMismatchError):
        ranapass.bias_step(tiny_model("LlamaForCausalLM", seed=5), plan, _windows(2), _windows(2))
