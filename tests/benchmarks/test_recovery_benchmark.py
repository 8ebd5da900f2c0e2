"""benchmarks/recovery.py: its table reads every row of a result, and a toy run from prepared windows."""

import pytest
from benchmark_scripts import load_benchmark

bench = load_benchmark("recovery.py", "recovery_bench")
(PLAN, RECOVERED), (TEAL, TEAL_RECOVERED) = bench.pairs("recover")


def _paired(rel: float) -> dict:
    return {"rel_ppl_diff": rel, "rel_se": 0.004}


def test_report_has_a_row_per_budget_plans_and_text():
    texts = ("python-docs", "debian-handbook")
    plan = {t: {"ppl": 23.74, "ratio": 0.561, "vs_dense": _paired(0.127)} for t in texts}
    recovered = {"recover_seconds": 17.0, "meta": {"kept_epoch": 3}, **{t: {"ppl": 23.0, "ratio": 0.562, "vs_dense": _paired(0.092),
                                                 "vs_plan": _paired(-0.031)} for t in texts}}
    res = {"dense": {t: {"ppl": 21.06} for t in texts}, "epochs": 3, "lr": 3e-3, "train_windows": 30,
           "device": "cuda", "torch": "2.11", "rows": {"0.56": {PLAN: plan, RECOVERED: recovered},
                                                      "0.4": {PLAN: plan, RECOVERED: recovered,
                                                              TEAL: plan, TEAL_RECOVERED: recovered}}}
    table = bench.report(res)
    assert table.count("| 0.56 |") == 2 and table.count("| 0.4 |") == 4
    assert table.index("| 0.4 |") < table.index("| 0.56 |")
    assert (f"| 0.56 | {PLAN} | python-docs | 23.74 (0.561) | +12.7 ± 0.4% | 23.00 (0.562) | +9.2 ± 0.4% | "
            "-3.1 ± 0.4% | 3 | 17 |") in table
    assert f"| 0.4 | {TEAL} | debian-handbook |" in table
    stepped = {**recovered, "meta": {"alpha": 0.00213}}
    res.update(method="bias-step", rows={"0.56": dict(zip(bench.pairs("bias-step")[0], (plan, stepped)))})
    table = bench.report(res)
    assert "Bias step: gradient pass over 30 windows" in table and "| step length |" in table
    assert "| 0.56 | ranapass (default plan) | python-docs | 23.74 (0.561) |" in table and "| 0.00213 | 17 |" in table
    assert bench.pairs("bias-step")[0][1] == "ranapass + bias step"


@pytest.mark.slow
def test_toy_run_from_prepared_windows(tiny_llama_dir, tmp_path, isolated_cache):
    spread = load_benchmark("calibration_spread.py", "calibration_spread_benchmark")
    prepared, out = tmp_path / "prepared", tmp_path / "out"
    assert spread.main(["prepare", "--out", str(prepared), "--replicas", "1", "--windows", "6", "--window", "128",
                        "--model", str(tiny_llama_dir)]) == 0
    res = bench.main(["--prepared", str(prepared), "--replica", "draw0", "--model", str(tiny_llama_dir),
                      "--out", str(out), "--threads", "1", "--budgets", "0.6", "--epochs", "1", "--teal"])
    rows = res["rows"]["0.6"]
    assert set(rows) == {PLAN, RECOVERED, TEAL, TEAL_RECOVERED}
    for row in rows.values():
        for text, count in spread.TEXTS.items():
            assert len(row[text]["window_nll"]) == count and 0 < row[text]["ratio"] <= 1 + 1e-6
    assert res["replica"] == "draw0" and res["train_windows"] == 4 and (out / "recovery.md").is_file()
