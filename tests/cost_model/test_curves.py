"""Candidate curves: predicted kept counts and errors equal what the adapters do on the sample."""

import numpy as np
import pytest
import torch

from ranapass.cost_model.curves import neuron_curve, rank_curve, rank_grid, static_rank_curve
from ranapass.decompose import gram_factor, output_pca, weight_svd
from ranapass.kernels.reference import neuron_adapter_reference, rank_adapter_reference


def _data(n=24, m=40, tokens=600, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g) @ torch.randn(n, n, generator=g)
    w = torch.randn(m, n, generator=g)
    return x, w


def test_output_pca_reproduces_weight_and_energies():
    x, w = _data()
    a, energy = output_pca(w, gram_factor(x.t().double() @ x.double(), x.shape[0]))
    b = a.t() @ w
    assert torch.allclose(a @ b, w, atol=1e-4)
    z = x @ b.t()
    assert torch.allclose(z.square().mean(0).double(), energy, rtol=1e-4)
    assert torch.all(energy[:-1] >= energy[1:])


@pytest.mark.parametrize("dead_inputs", [0, 3])
def test_gram_factor_reproduces_the_second_moment(dead_inputs):
    """Cholesky where the moment is positive definite; inputs that are always 0 make it singular, and the
    eigendecomposition's factor serves instead."""
    x, w = _data()
    x[:, :dead_inputs] = 0.0
    gram = x.t().double() @ x.double()
    factor = gram_factor(gram, x.shape[0])
    assert torch.allclose(factor @ factor.t(), gram / x.shape[0], rtol=1e-9, atol=1e-9)
    assert torch.isfinite(factor).all()
    a, energy = output_pca(w, factor)
    live = w[:, dead_inputs:]   # the axes of zero energy may be any completion: dead inputs' columns aside
    assert torch.allclose(a @ (a.t() @ live), live, atol=1e-4)
    assert torch.allclose((x @ (a.t() @ w).t()).square().mean(0).double(), energy, rtol=1e-4, atol=1e-6)


def test_rank_curve_errors_are_measured_errors():
    x, w = _data()
    m, n = w.shape
    a, _ = output_pca(w, gram_factor(x.t().double() @ x.double(), x.shape[0]))
    out_weight = torch.rand(m) + 0.5
    rank_weight = (a.square() * out_weight[:, None]).sum(0)
    z = x @ (a.t() @ w).t()
    curve = rank_curve(z, rank_weight, m, n, ranks=[8, 16, 24])
    y = x @ w.t()
    for i in range(0, len(curve), 7):
        nb, tau = int(curve.rank[i]), float(curve.tau[i])
        b, at = a[:, :nb].t() @ w, a[:, :nb].t()
        yhat = rank_adapter_reference(x, b, at, torch.full((nb,), tau))
        kept = (x @ b.t()).abs() >= tau
        assert abs(kept.sum(1).float().mean() - curve.kept[i]) < 1e-3
        # The per-rank weights are exact for a diagonal output weight only up to cross terms;
        # with a uniform weight they are exact.
        err_uniform = ((y - yhat).square().sum(1)).mean()
        flat = rank_curve(z, torch.ones(n), m, n, ranks=[nb])
        j = int(np.flatnonzero(np.isclose(flat.tau, tau))[0])
        assert abs(flat.error[j] - float(err_uniform)) <= 1e-3 * float(y.square().sum(1).mean())
    assert curve.flops.min() < 2 * m * n < curve.flops.max()


def test_rank_curve_thresholds_and_errors_are_the_sorted_scores_of_each_static_rank():
    """Brute force per static rank: the k-th largest |z| among its ranks, and the energy of the rest."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(97, 30, generator=g) * torch.linspace(2, 0.2, 30)
    rank_weight = torch.rand(30, generator=g) + 0.1
    ranks = [1, 4, 13, 30]
    curve = rank_curve(z, rank_weight, 50, 30, ranks=ranks)
    energy = (z.square() * rank_weight).double()
    total = float(energy.sum()) / 97
    for i in range(len(curve)):
        nb, kept = int(curve.rank[i]), curve.kept[i]
        k = int(round(kept * 97))
        scores, order = z[:, :nb].abs().reshape(-1).sort(descending=True)
        if curve.tau[i] == 0:
            assert k == 97 * nb and curve.error[i] == pytest.approx(total - float(energy[:, :nb].sum()) / 97, abs=1e-9)
        elif k == 0:
            assert curve.tau[i] > float(scores[0]) and curve.error[i] == pytest.approx(total, rel=1e-12)
        else:
            assert curve.tau[i] == pytest.approx(float(scores[k - 1]), rel=1e-7)
            top = float(energy[:, :nb].reshape(-1)[order[:k]].sum())
            assert curve.error[i] == pytest.approx(total - top / 97, rel=1e-9, abs=1e-9)


def test_neuron_curve_errors_are_measured_errors():
    x, w = _data(n=32, m=12)
    out_weight = torch.rand(12) + 0.5
    curve = neuron_curve(x, w, out_weight, exact_tokens=x.shape[0])
    col = w.norm(dim=0)
    for i in range(len(curve)):
        t = curve.tau[i] / col
        yhat = neuron_adapter_reference(x, w.t(), t)
        err = (((x @ w.t()) - yhat).square() * out_weight).sum(1).mean()
        # tau sits on a sample score: rounding of tau / ||W_j|| may flip that one boundary entry
        assert abs(float(err) - curve.error[i]) <= 5e-3 * max(1.0, float(err))
        kept = (x.abs() >= t).sum(1).float().mean()
        assert abs(float(kept) - curve.kept[i]) <= 1.0 / x.shape[0] + 1e-6
    assert curve.error[-1] == 0 and curve.kept[-1] == 32


def test_static_rank_curve_from_spectrum():
    _, w = _data()
    u, s2 = weight_svd(w)
    curve = static_rank_curve(s2, torch.ones_like(s2), *w.shape, ranks=[4, 24])
    assert np.allclose(curve.error, [float(s2[4:].sum()), 0.0])
    assert np.all(curve.tau == 0)


def test_rank_grid_is_sorted_and_bounded():
    grid = rank_grid(576)
    assert grid == sorted(set(grid)) and grid[-1] == 576 and all(g % 8 == 0 for g in grid)
    assert rank_grid(5)[-1] == 5
