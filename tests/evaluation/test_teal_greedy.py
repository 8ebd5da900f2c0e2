"""TEAL's greedy per-block allocation on a tiny random Llama: targets, monotonicity, block error, exactness."""

import numpy as np
import pytest
import torch
from plans import fresh_dynamo  # noqa: F401 (fixture)

import ranapass
from ranapass.backend import RanaBackend
from ranapass.baselines import measured_ratio, teal
from ranapass.baselines_greedy import teal_greedy, transformer_blocks
from ranapass.data import split_holdout
from ranapass.errors import RanapassError
from ranapass.hooks import forward_hooks
from tiny_models import tiny_llama, token_windows

GREEDY_WINDOWS = 2
HOLDOUT_WINDOWS = 4
LAST_FRACTION = 0.25


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def windows():
    return token_windows(12)


@pytest.fixture(scope="module")
def greedy(model, windows):
    return teal_greedy(model, windows, holdout_windows=HOLDOUT_WINDOWS, sample_tokens=512,
                       greedy_windows=GREEDY_WINDOWS, step=0.05,
                       max_sparsity=0.8, last_fraction=LAST_FRACTION)


@pytest.fixture(scope="module")
def uniform(model, windows):
    return teal(model, windows, sample_tokens=512)


def _sparsity_by_projection(plan):
    return plan.meta["projection_sparsity"]


def test_every_block_hits_the_target(greedy):
    assert list(greedy.paths) == ["model.layers.0", "model.layers.1"]
    for target in (0.0, 0.13, 0.4, 0.77, 0.9):  # 0.9: beyond the search, straight on to 1
        plan = greedy.plan_at(target)
        assert plan.meta["beyond_greedy_paths"] == (target > 0.8)
        per = _sparsity_by_projection(plan)
        for block, path in greedy.paths.items():
            s = np.array([per[p] for p in path.projections])
            assert s @ path.weights == pytest.approx(target, abs=1e-9), block
            assert ((0.0 <= s) & (s <= 1.0)).all()
        # parameter shares from the shapes: q, o 64x64; k, v 32x64; gate, up, down 160x64
        np.testing.assert_allclose(greedy.paths["model.layers.0"].weights, np.array([4, 2, 2, 4, 10, 10, 10]) / 42)
    kinds = {u.kind for u in greedy.plan_at(0.5).units}
    assert kinds == {"neuron"} and len(greedy.plan_at(0.5).units) == 14


def test_more_budget_means_less_sparsity_everywhere(model, greedy):
    targets = np.linspace(0.0, 1.0, 41)
    per = [_sparsity_by_projection(greedy.plan_at(float(t))) for t in targets]
    for name in per[0]:
        seq = np.array([p[name] for p in per])
        assert (np.diff(seq) >= -1e-12).all(), name
    cutoffs = np.array([[u.adapter.tau for u in greedy.plan_at(float(t)).units] for t in targets])
    assert (cutoffs[1:] >= cutoffs[:-1]).all()
    tight, loose = greedy.plan(0.5, tolerance=0.005), greedy.plan(0.7, tolerance=0.005)
    for plan, budget in ((tight, 0.5), (loose, 0.7)):
        assert measured_ratio(model, plan, greedy.holdout) == pytest.approx(budget, abs=0.005)
    assert all(_sparsity_by_projection(tight)[n] >= _sparsity_by_projection(loose)[n] for n in per[0])
    assert any(_sparsity_by_projection(tight)[n] > _sparsity_by_projection(loose)[n] for n in per[0])


def _first_block_error(model, plan, data):
    """Relative squared error of block 0's output under ``plan`` (attached) against dense, on the last tokens."""
    outs = []
    block = model.model.layers[0]
    with forward_hooks([(block, lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))]), torch.no_grad():
        model(data, use_cache=False)
        with ranapass.attach(model, plan).eager():
            model(data, use_cache=False)
    ranapass.detach(model)
    dense, adapted = outs
    start = int(dense.shape[1] * (1 - LAST_FRACTION))
    return float((adapted[:, start:] - dense[:, start:]).square().sum() / dense[:, start:].square().sum())


def test_block_error_is_the_adapters_and_no_worse_than_uniform(model, windows, greedy, uniform):
    """On the greedy windows, the attached plan's block error is the one the search recorded, and it is no
    larger than uniform TEAL-style's at the same sparsity (block 0 reads the embeddings: dense in both)."""
    data = split_holdout(windows, HOLDOUT_WINDOWS)[0][:GREEDY_WINDOWS]   # the windows it searched on
    path = greedy.paths["model.layers.0"]
    checked = 0
    for i in range(2, len(path.states), 3):
        target = float(path.effective[i])
        got = _first_block_error(model, greedy.plan_at(target), data)
        assert got == pytest.approx(path.errors[i], rel=1e-3, abs=1e-9)
        base = _first_block_error(model, uniform.plan_at(target), data)
        assert base == pytest.approx(path.uniform_errors[i], rel=1e-3, abs=1e-9)
        assert got <= base * (1 + 1e-6), target
        checked += 1
    assert checked >= 3
    assert path.errors[0] == 0.0 and (np.diff(path.errors) >= -1e-12).all()


def test_sparsity_zero_reproduces_dense(model, greedy):
    ids = token_windows(2, seed=5)
    with torch.no_grad():
        dense = model(ids).logits
        with ranapass.attach(model, greedy.plan_at(0.0)).eager():
            out = model(ids).logits
    ranapass.detach(model)
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=0)


def test_compiled_equals_eager(model, greedy, fresh_dynamo):  # noqa: F811
    """q, k and v read one input through three masks of their own: the pass rewrites each."""
    plan = greedy.plan_at(0.5)
    ids = token_windows(2, seed=5)
    with torch.no_grad():
        with ranapass.attach(model, plan).eager():
            eager = model(ids).logits
        ranapass.detach(model)
        ranapass.attach(model, plan)
        backend = RanaBackend(compiler="aot_eager", strict=True)
        try:
            out = torch.compile(model, backend=backend, fullgraph=True)(ids).logits
        finally:
            ranapass.detach(model)
    assert [r.rewritten for r in backend.reports] == [14]
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)


def test_linears_outside_blocks_are_refused():
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.SiLU(), torch.nn.Linear(16, 8))
    with pytest.raises(RanapassError, match="no repeated block"):
        transformer_blocks(mlp, ["0", "2"])
    with pytest.raises(RanapassError, match="step"):
        teal_greedy(mlp, torch.randn(12, 4, 8), step=0.0)
