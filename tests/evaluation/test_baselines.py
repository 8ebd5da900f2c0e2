"""TEAL-style and CATS-style baselines on tiny random models: structure, exactness, budgets, persistence."""

import pytest
import torch
from plan_damage import resave
from plans import fresh_dynamo  # noqa: F401 (fixture)

import ranapass
from ranapass.backend import RanaBackend
from ranapass.baselines import GatedMaskAdapterSpec, cats, find_gated_mlps, measured_ratio, teal
from ranapass.bound import bind
from ranapass.cost_model import flops
from tiny_models import tiny_llama, token_windows

ATOL = 1e-5  # float32 logits of the tiny model


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def windows():
    return token_windows(12)


@pytest.fixture(scope="module")
def teal_baseline(model, windows):
    return teal(model, windows, sample_tokens=512)


@pytest.fixture(scope="module")
def cats_baseline(model, windows):
    return cats(model, windows, sample_tokens=512)


def _logits(model, plan=None, ids=None):
    ids = token_windows(2, seed=5) if ids is None else ids
    if plan is None:
        return model(ids).logits
    with ranapass.attach(model, plan).eager():
        out = model(ids).logits
    ranapass.detach(model)
    return out


def test_finds_gated_mlps_by_what_they_compute(model, windows):
    mlps = find_gated_mlps(model, windows[:1])
    assert [(m.gate, m.up, m.down, m.activation) for m in mlps] == [
        (f"model.layers.{i}.mlp.gate_proj", f"model.layers.{i}.mlp.up_proj", f"model.layers.{i}.mlp.down_proj", "silu")
        for i in range(2)]


def test_a_plain_mlp_has_no_gated_mlp():
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.SiLU(), torch.nn.Linear(16, 8))
    assert find_gated_mlps(mlp, torch.randn(4, 8)) == []
    with pytest.raises(ValueError, match="no gated MLP"):
        cats(mlp, torch.randn(12, 4, 8), holdout_windows=0)


@pytest.mark.parametrize("make", ["teal", "cats"])
def test_sparsity_zero_reproduces_dense(model, make, teal_baseline, cats_baseline):
    baseline = teal_baseline if make == "teal" else cats_baseline
    plan = baseline.plan_at(0.0)
    assert plan.adapted
    torch.testing.assert_close(_logits(model, plan), _logits(model), atol=ATOL, rtol=0)


def test_teal_units_are_input_sites_with_one_cutoff(teal_baseline):
    plan = teal_baseline.plan_at(0.5)
    names = [u.name for u in plan.units]
    assert "model.layers.0.self_attn.{q_proj,k_proj,v_proj}" in names
    assert "model.layers.0.mlp.{gate_proj,up_proj}" in names
    assert len(plan.units) == 8 and all(u.kind == "neuron" for u in plan.units)
    for u in plan.units:
        t = u.adapter.thresholds
        assert torch.all(t == t[0]) and float(t[0]) == pytest.approx(u.adapter.tau) and u.adapter.tau > 0


def test_cats_masks_up_rows_and_down_columns_together(model, cats_baseline):
    plan = cats_baseline.plan_at(0.6)
    kinds = {u.name: u.kind for u in plan.units}
    assert kinds["model.layers.0.mlp.{gate_proj,up_proj}"] == "gated_mask"
    assert kinds["model.layers.0.mlp.down_proj"] == "neuron"
    assert kinds["model.layers.0.self_attn.q_proj"] == "dense"
    ids = token_windows(2, seed=5)
    att = ranapass.attach(model, plan)
    with att.eager(), ranapass.FlopMeter() as meter:
        model(ids)
    att.detach()
    gate_unit = plan.unit("model.layers.0.mlp.{gate_proj,up_proj}")
    # the down projection keeps exactly the units the gate kept, and the mean kept count is near 40%
    assert meter.mean_kept("model.layers.0.mlp.down_proj") == pytest.approx(meter.mean_kept(gate_unit.name))
    assert 0.2 < meter.mean_kept(gate_unit.name) / 160 < 0.6
    # FLOPs per token: gate dense, up and down on the kept units, plus the two masks
    k = meter.mean_kept(gate_unit.name)
    want = 2 * 64 * 160 + 2 * 64 * k + 2 * 160 + 2 * 64 * k + 2 * 160
    got = gate_unit.flops(k) + plan.unit("model.layers.0.mlp.down_proj").flops(k)
    assert got == pytest.approx(want)


def test_gated_mask_matches_its_definition(model):
    mlp = model.model.layers[0].mlp
    g_w, u_w = mlp.gate_proj.weight, mlp.up_proj.weight
    spec = GatedMaskAdapterSpec(("g", "u"), (160, 160), 64, 0.1, thresholds=torch.full((160,), 0.1))
    bound = bind(spec, [g_w, u_w], [None, None])
    x = torch.randn(3, 5, 64)
    g, u = x @ g_w.t(), x @ u_w.t()
    keep = torch.nn.functional.silu(g).abs() >= 0.1
    torch.testing.assert_close(bound(x), torch.cat([g, u * keep], -1), atol=ATOL, rtol=0)
    assert torch.equal(bound.kept(x), keep.sum(-1))
    assert flops.per_token(spec.flops(10)) == 2 * 64 * 160 + 2 * 64 * 10 + 2 * 160


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_cats_plan_compiles_and_equals_eager(model, cats_baseline, compiler, fresh_dynamo):  # noqa: F811
    """The gated-mask kind has no op: the pass traces its reference math, and the result is the eager one."""
    plan = cats_baseline.plan_at(0.5)
    ids = token_windows(2, seed=5)
    with torch.no_grad():
        eager = _logits(model, plan, ids)
        ranapass.attach(model, plan)
        backend = RanaBackend(compiler=compiler, strict=True)
        try:
            out = torch.compile(model, backend=backend, fullgraph=True)(ids).logits
        finally:
            ranapass.detach(model)
    assert [r.rewritten for r in backend.reports] == [len(plan.adapted)] == [4]
    ops = {r.op for r in backend.reports[0].rewrites}
    assert ops == {"ranapass.adapters.gated_mask.gated_mask_reference", "ranapass.gated_neuron_adapter"}
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)


def test_gated_mask_rejects_bad_shapes():
    with pytest.raises(ValueError, match="equal width"):
        GatedMaskAdapterSpec(("g", "u"), (16, 8), 4, 0.0, thresholds=torch.zeros(16))
    with pytest.raises(ValueError, match="thresholds of shape"):
        GatedMaskAdapterSpec(("g", "u"), (16, 16), 4, 0.0, thresholds=torch.zeros(8))
    with pytest.raises(ValueError, match="activation"):
        GatedMaskAdapterSpec(("g", "u"), (16, 16), 4, 0.0, activation="relu2", thresholds=torch.zeros(16))


@pytest.mark.parametrize("make,budget", [("teal", 0.5), ("teal", 0.8), ("cats", 0.75)])
def test_plan_hits_the_measured_budget(model, make, budget, teal_baseline, cats_baseline):
    baseline = teal_baseline if make == "teal" else cats_baseline
    plan = baseline.plan(budget, tolerance=0.005)
    assert measured_ratio(model, plan, baseline.holdout) == pytest.approx(budget, abs=0.005)
    assert getattr(model, "_ranapass_attachment", None) is None  # nothing left attached


def test_budget_below_reach_is_a_clear_error(cats_baseline):
    with pytest.raises(ValueError, match="below the cheapest cats"):
        cats_baseline.plan(0.3)
    with pytest.raises(ValueError, match="budget must be in"):
        cats_baseline.plan(1.5)


def test_cats_plan_save_load_roundtrip(model, cats_baseline, tmp_path):
    plan = cats_baseline.plan_at(0.5)
    plan.save(tmp_path / "plan")
    loaded = ranapass.Plan.load(tmp_path / "plan")
    assert loaded.unit("model.layers.1.mlp.{gate_proj,up_proj}").adapter.activation == "silu"
    assert torch.equal(_logits(model, loaded), _logits(model, plan))


def test_teal_thresholds_refit_with_teal_criterion(model, teal_baseline, tmp_path):
    """A TEAL-style unit cuts ``|x_j|`` with one cutoff: fitting its thresholds again keeps them uniform
    (not ``tau / ||W[:, j]||``), and a saved plan says so."""
    from ranapass.thresholds import fit_thresholds

    plan = teal_baseline.plan_at(0.5)
    fit_thresholds(model, plan, teal_baseline.holdout)
    for u in plan.adapted:
        assert not u.adapter.weighted
        assert torch.equal(u.adapter.thresholds, torch.full_like(u.adapter.thresholds, u.adapter.tau))
    loaded = ranapass.Plan.load(plan.save(tmp_path / "plan"))
    assert [u.adapter.weighted for u in loaded.adapted] == [False] * len(plan.adapted)

    def unstated(doc, _tensors):  # a plan saved before neuron adapters said their criterion: RaNA's
        for u in doc["units"]:
            if u["adapter"] is not None:
                del u["adapter"]["weighted"]
    resave(tmp_path / "plan", unstated)
    assert [u.adapter.weighted for u in ranapass.Plan.load(tmp_path / "plan").adapted] == [True] * len(plan.adapted)


def test_static_low_rank_uniform_has_no_masks(model, windows):
    from ranapass.profiling import ProfileOptions, profile

    prof = profile(model, windows, options=ProfileOptions(sample_tokens=256, gradient_windows=2), cache=False)
    plan = prof.plan(0.6, allocation="uniform", kinds=("lowrank",), fit=False)
    assert {u.kind for u in plan.units} == {"rank", "dense"}
    assert all(float(u.adapter.thresholds.max()) == 0.0 for u in plan.adapted)
    assert plan.expected_ratio() <= 0.6 + 1e-9
    # the reference recipe keeps its neuron adapters on the narrow (down) projections
    assert "neuron" in {u.kind for u in prof.plan(0.6, allocation="uniform", fit=False).units}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with pytest -m gpu)")
@pytest.mark.parametrize("make", [teal, cats], ids=["teal", "cats"])
def test_baselines_calibrate_a_model_on_the_gpu(make, windows):
    gpu = tiny_llama().cuda()
    baseline = make(gpu, windows, sample_tokens=512)
    plan = baseline.plan(0.75, tolerance=0.005)
    assert measured_ratio(gpu, plan, baseline.holdout) == pytest.approx(0.75, abs=0.005)
    assert plan.meta["sparsity"] == pytest.approx(make(tiny_llama(), windows, sample_tokens=512).plan(
        0.75, tolerance=0.005).meta["sparsity"], abs=0.02)
