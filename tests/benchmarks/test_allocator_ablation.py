"""benchmarks/allocator_ablation.py: its table shows every method's paired differences as computed."""

import pytest
from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def ablation():
    return load_benchmark("allocator_ablation.py", "allocator_ablation")


def test_report_shows_the_paired_differences(ablation):
    from quality import paired

    base, teal, other = [2.0, 2.5, 3.0, 2.2], [2.1, 2.55, 3.2, 2.25], [1.95, 2.48, 2.9, 2.21]
    rows = {}
    for name, nll in ((ablation.BASE, base), ("both (default)", other), ("TEAL-style", teal)):
        rows[name] = {"docs": {"ppl": 10.0, "ratio": 0.56, "window_nll": nll,
                               "vs_base": paired(nll, base), "vs_teal": paired(nll, teal)}}
    table = ablation.report({"dense": {"docs": {"ppl": 9.0}}, "rows": {"0.56": rows}})
    assert "Dense: docs 9.00." in table
    line = next(x for x in table.splitlines() if "| both (default) |" in x)
    expected = paired(other, base)
    assert f"{100 * expected['rel_ppl_diff']:+.2f} ± {100 * expected['rel_se']:.2f}%" in line
    assert "| 10.00 (0.560) |" in line
