"""benchmarks/recovery.py: its table reads every row of a result (a synthetic one: the real run takes minutes)."""

from benchmark_scripts import load_benchmark

bench = load_benchmark("recovery.py", "recovery_bench")


def _paired(rel: float) -> dict:
    return {"rel_ppl_diff": rel, "rel_se": 0.004}


def test_report_has_a_row_per_budget_and_text():
    texts = ("python-docs", "debian-handbook")
    row = {bench.PLAN: {t: {"ppl": 23.74, "ratio": 0.561, "vs_dense": _paired(0.127)} for t in texts},
           bench.RECOVERED: {"recover_seconds": 17.0,
                             **{t: {"ppl": 23.0, "ratio": 0.562, "vs_dense": _paired(0.092),
                                    "vs_plan": _paired(-0.031)} for t in texts}}}
    res = {"dense": {t: {"ppl": 21.06} for t in texts}, "epochs": 3, "lr": 3e-3, "train_windows": 30,
           "device": "cuda", "torch": "2.11", "rows": {"0.56": row, "0.4": row}}
    table = bench.report(res)
    assert table.count("| 0.56 |") == 2 and table.count("| 0.4 |") == 2
    assert table.index("| 0.4 |") < table.index("| 0.56 |")
    assert "| 23.74 (0.561) | +12.7 ± 0.4% | 23.00 (0.562) | +9.2 ± 0.4% | -3.1 ± 0.4% | 17 |" in table
