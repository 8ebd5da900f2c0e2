"""benchmarks/loss_probes.py: its table shows each probe's figures and the ratio of KL per proxy between levels."""

import pytest
from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def probes():
    return load_benchmark("loss_probes.py", "loss_probes")


def test_report_shows_each_level_and_the_ratio_between_levels(probes):
    row = {"0.5": {"kl": 2e-2, "nll_change": 1e-2, "proxy": 0.1, "kl_per_proxy": 0.2},
           "0.85": {"kl": 1e-3, "nll_change": -2e-3, "proxy": 1e-3, "kl_per_proxy": 1.0}}
    table = probes.report({"windows": 2, "kept": [0.5, 0.85], "rows": {"model.layers.*.self_attn.v_proj": row}})
    line = next(x for x in table.splitlines() if x.startswith("| model.layers.*.self_attn.v_proj |"))
    assert "| 2.00e-02 | +1.00e-02 | 0.2 |" in line and "| 1.00e-03 | -2.00e-03 | 1 |" in line
    assert line.endswith("| 5.00 |")
    assert "2 held-out calibration windows" in table
