"""benchmarks/rsparse_feasibility.py: its errors and FLOPs are the compensated kind's math, checked in float64."""

import numpy as np
import pytest
import torch
from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def feas():
    return load_benchmark("rsparse_feasibility.py", "rsparse_feasibility")


@pytest.mark.parametrize("shape", [(16, 20), (24, 16)])
def test_curves_match_a_float64_computation(feas, shape):
    m, n = shape
    g = torch.Generator().manual_seed(0)
    w = torch.randn(m, n, generator=g)
    x_fit = torch.randn(300, n, generator=g) * torch.rand(n, generator=g) * 3
    x_held = torch.randn(200, n, generator=g) * torch.rand(n, generator=g) * 3
    curves = feas.unit_curves(w, x_fit, x_held, aware_ranks=[4])
    columns = curves["columns"]
    assert columns[0] == ("plain", 0) and ("plain", 8) in columns and columns[-2:] == [("aware", 4), ("mean", 0)]
    i = int(np.flatnonzero(feas.KEEP == 0.5)[0])
    wd, xf, xh = w.double(), x_fit.double(), x_held.double()
    scores_fit = xf.abs() * wd.norm(dim=0)
    tau = torch.sort(scores_fit.reshape(-1), descending=True).values[scores_fit.numel() // 2 - 1]
    d_fit = torch.where(scores_fit >= tau, 0.0, xf)
    d_held = torch.where(xh.abs() * wd.norm(dim=0) >= tau, 0.0, xh)
    total_held = (xh @ wd.t()).square().sum(1).mean()
    # rank 0: the neuron adapter's held-out error and kept fraction
    neuron = (d_held @ wd.t()).square().sum(1).mean() / total_held
    assert curves["err_held"][i, 0] == pytest.approx(float(neuron), rel=1e-4)
    assert curves["kept_held"][i, 0] == pytest.approx(float((d_held == 0).double().mean()), abs=1e-6)
    # rank 8: L = A A^T W with A the top axes of W C_d W^T (C_d fitted on the calibration tokens)
    evals, evecs = torch.linalg.eigh(wd @ (d_fit.t() @ d_fit) @ wd.t())
    a = evecs[:, -8:]
    resid = d_held @ wd.t() - (d_held @ wd.t()) @ a @ a.t()
    j = columns.index(("plain", 8))
    assert curves["err_held"][i, j] == pytest.approx(float(resid.square().sum(1).mean() / total_held), rel=1e-3)
    # the mean bias W E[d_fit] subtracted from the held-out dropped part
    j = columns.index(("mean", 0))
    bias = ((d_held - d_fit.mean(0)) @ wd.t()).square().sum(1).mean() / total_held
    assert curves["err_held"][i, j] == pytest.approx(float(bias), rel=1e-4)
    # full rank restores every dropped input: no error left
    full = columns.index(("plain", min(m, n)))
    assert np.all(curves["err_held"][:, full] < 1e-5) and np.all(curves["err_fit"][:, full] < 1e-5)


def test_flops_and_choice(feas):
    # r = 0 is the neuron adapter: 2 m k + 2 n over 2 m n; a rank adds 2 r (n + m) (full) or 2 r (n - k + m)
    assert feas.flop_ratio(4, 10, np.array([0.5]), 0, "full")[0] == pytest.approx((2 * 4 * 5 + 20) / 80)
    assert feas.flop_ratio(4, 10, np.array([0.5]), 2, "full")[0] == pytest.approx((40 + 20 + 56) / 80)
    assert feas.flop_ratio(4, 10, np.array([0.5]), 2, "dropped-only")[0] == pytest.approx((40 + 20 + 36) / 80)
    keep = np.array([0.2, 0.6, 1.0])
    curves = {"m": 100, "n": 100, "columns": [("plain", 0), ("plain", 4), ("mean", 0)],
              "kept_fit": np.stack([keep] * 3, 1), "kept_held": np.stack([keep] * 3, 1),
              "err_fit": np.array([[0.4, 0.01, 0.2], [0.1, 0.001, 0.05], [0, 0, 0]]),
              "err_held": np.array([[0.4, 0.02, 0.2], [0.1, 0.002, 0.05], [0, 0, 0]])}
    row = next(r for r in feas.compare(curves, "full") if r["ratio"] == 0.6)
    assert row["rank"] == 4 and row["neuron"] > row["compensated"] > 0 and 0 < row["gain"] < 1
    assert row["mean_bias_gain"] == pytest.approx(0.5)  # same FLOPs as the neuron adapter, half its error
