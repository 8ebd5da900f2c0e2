"""Every family of :mod:`architectures` end to end: profile -> plan(0.6) -> attach -> compile (aot_eager).

For each: the eager adapted output differs from the dense one (the plan does something), the backend rewrote
every adapted unit of the plan (``backend.check``, one rewrite per unit), and the compiled output equals the
eager adapted one. GPT-2's ``Conv1D`` (``addmm`` with the weight stored (in, out)) and Falcon's ``x @ w.T`` are
linears like any other; mixture-of-experts models adapt attention and report their 3D experts left dense.

Calibration: 8 random windows of 32 tokens (2 held out for the thresholds), Fisher weights from 2 of them.
About a second per family after the first.
"""

from __future__ import annotations

import functools

import pytest
import torch
from architectures import FAMILIES, MOE, batches, build, output

import ranapass
from ranapass.attach import temporarily_attached
from ranapass.diff import GraphCapture, GraphDiff

pytestmark = pytest.mark.slow

FP32 = dict(rtol=1e-4, atol=1e-5)
MIN_EFFECT = 1e-4
"""Smallest relative difference between the eager adapted and the dense outputs that shows the plan acts."""


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@functools.cache
def run_family(family: str) -> dict:
    """Profile, plan at 0.6, then the dense, eager adapted and compiled outputs on two held-out inputs (once per
    family and session: the tests only read the results)."""
    fam = FAMILIES[family]
    model = build(family)
    data = batches(family, 8, 32)
    test = batches(family, 2, 32, seed=1)
    test = test if isinstance(test, torch.Tensor) else test[0]
    options = ranapass.ProfileOptions(gradient_windows=2)
    plan = ranapass.profile(model, data, options=options, loss_fn=fam.loss_fn, cache=False).plan(0.6)
    with torch.no_grad():
        dense = output(model, test)
        with temporarily_attached(model, plan):
            eager = output(model, test)
        ranapass.attach(model, plan)
        backend = ranapass.RanaBackend(compiler="aot_eager")
        compiled = output(torch.compile(model, backend=backend), test)
    return dict(model=model, plan=plan, backend=backend, dense=dense, eager=eager, compiled=compiled)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_compiles_to_its_eager_adapted_model(family):
    run = run_family(family)
    plan, backend = run["plan"], run["backend"]
    assert plan.adapted, "the plan at 0.6 adapts nothing"
    assert relative(run["eager"], run["dense"]) > MIN_EFFECT
    assert backend.unrewritten(run["model"]) == [], "\n".join(r.summary() for r in backend.reports)
    assert sum(r.rewritten for r in backend.reports) == len(plan.adapted)
    torch.testing.assert_close(run["compiled"], run["eager"], **FP32)


@pytest.mark.parametrize("family", MOE)
def test_moe_experts_are_reported_dense(family):
    run = run_family(family)
    reports = run["backend"].reports
    experts = [d for r in reports for d in r.experts]
    assert experts and all(".experts." in d.path and d.flops > 0 for d in experts)
    assert "expert parameter(s)" in "\n".join(r.summary() for r in reports)
    assert "3D expert weights are not adapted" in run["plan"].summary()
    rows = GraphDiff([GraphCapture([], [], r) for r in reports], None).rows()
    assert {r["module"] for r in rows if r["old_op"] == "3D expert weight"} == {d.path for d in experts}
