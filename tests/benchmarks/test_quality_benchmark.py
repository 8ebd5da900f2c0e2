"""benchmarks/quality.py end to end at toy size: a tiny random Llama, every method, table, plot and JSON."""

import json
import math

import pytest
from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def quality():
    return load_benchmark("quality.py", "quality_benchmark")


@pytest.mark.slow
def test_quick_run_writes_table_plot_and_json(quality, tiny_llama_dir, tmp_path, isolated_cache):
    assert quality.main(["--quick", "--model", str(tiny_llama_dir), "--out", str(tmp_path), "--threads", "1"]) == 0
    result = json.loads((tmp_path / "quality.json").read_text())
    methods = {r["method"] for r in result["rows"]}
    assert methods == set(quality.METHODS) | set(quality.ABLATIONS)
    windows = quality.Settings.quick().eval_windows
    for text in quality.TEXTS:
        assert len(result["dense"][text]["window_nll"]) == windows
        assert f" {windows} non-overlapping windows" in result["protocol"]["texts"][text]  # the count scored
    for row in result["rows"]:
        if row["feasible"]:
            for text in quality.TEXTS:
                r = row["texts"][text]
                assert r["ppl"] > 0 and 0 < r["ratio"] <= 1.0 + 1e-6
                assert len(r["window_nll"]) == windows
                # every loss kept: the perplexity is exp of their mean (windows of equal length)
                assert r["ppl"] == pytest.approx(math.exp(sum(r["window_nll"]) / windows), rel=1e-9)
                if row["method"] == quality.REFERENCE:
                    assert r["vs_global"]["rel_ppl_diff"] == 0.0 and r["vs_global"]["verdict"] == "tie"
                    assert r["vs_dense"]["rel_ppl_diff"] == pytest.approx(r["ppl"] / result["dense"][text]["ppl"] - 1)
                elif row["budget"] in quality.Settings.quick().budgets:
                    ref = next(x for x in result["rows"] if x["method"] == quality.REFERENCE
                               and x["budget"] == row["budget"])["texts"][text]["ppl"]
                    assert r["vs_global"]["rel_ppl_diff"] == pytest.approx(r["ppl"] / ref - 1, rel=1e-6)
    table = (tmp_path / "quality.md").read_text()
    assert "| ranapass (global) |" in table and "Total wall time" in table
    assert "| TEAL-style (greedy per block) |" in table and table.count("Paired against ranapass (global)") == 2
    assert table.count("ranapass (global) + bias step lowest of all methods but its own plan or step") == 2
    assert all("bias_step" in r for r in result["rows"] if r["method"].endswith("+bias-step") and r["feasible"])
    assert (tmp_path / "quality.png").stat().st_size > 10_000
    assert not (tmp_path / "quality.partial.json").exists()  # the rows measured so far, gone once the run ends
    assert result["command"].endswith("--threads 1")
    rerun_only_replaces_its_method(quality, tiny_llama_dir, tmp_path, result)


def test_prepared_windows_are_the_protocols_only(quality, tiny_llama_dir, tmp_path):
    with pytest.raises(SystemExit, match="cannot be combined with --quick"):
        quality.main(["--quick", "--prepared", str(tmp_path), "--model", str(tiny_llama_dir), "--out", str(tmp_path)])


def rerun_only_replaces_its_method(quality, model_dir, out, before):
    """``--only METHOD`` measures that method again (same protocol) and leaves every other row as it was."""
    args = ["--quick", "--model", str(model_dir), "--out", str(out), "--threads", "1", "--only", "lowrank-uniform"]
    assert quality.main(args) == 0
    after = json.loads((out / "quality.json").read_text())
    kept = [r for r in before["rows"] if r["method"] != "lowrank-uniform"]
    assert [r for r in after["rows"] if r["method"] != "lowrank-uniform"] == kept
    assert sorted(r["budget"] for r in after["rows"] if r["method"] == "lowrank-uniform") == \
        sorted(r["budget"] for r in before["rows"] if r["method"] == "lowrank-uniform")
    assert after["reruns"][-1]["methods"] == ["lowrank-uniform"]
    assert "measured again" in (out / "quality.md").read_text()


@pytest.mark.parametrize("diffs,verdict", [
    ([0.010, 0.030, 0.020, 0.020], "higher"),   # +2% with a paired SE of 0.4%: ranapass lower beyond noise
    ([-0.010, -0.030, -0.020, -0.020], "lower"),
    ([0.001, 0.002, 0.001, 0.002], "tie"),      # +0.15%: within 0.2% whatever the noise
    ([0.05, -0.04, 0.03, -0.03], "noise"),      # +0.25% with a paired SE of 2%
])
def test_paired_difference_and_verdict(quality, diffs, verdict):
    reference = [2.0 + 0.5 * i for i in range(len(diffs))]  # the windows' own difficulty cancels in the pairs
    got = quality.paired([r + d for r, d in zip(reference, diffs)], reference)
    mean = sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1))
    assert got["nll_diff"] == pytest.approx(mean) and got["nll_diff_se"] == pytest.approx(sd / 2)
    assert got["rel_ppl_diff"] == pytest.approx(math.exp(mean) - 1)
    assert got["rel_se"] == pytest.approx(math.exp(mean) * sd / 2)
    assert got["verdict"] == verdict


def test_paired_needs_matching_windows(quality):
    with pytest.raises(ValueError, match="must match"):
        quality.paired([1.0, 2.0], [1.0, 2.0, 3.0])
