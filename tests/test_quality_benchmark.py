"""benchmarks/quality.py end to end at toy size: a tiny random Llama, every method, table, plot and JSON."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

QUALITY = Path(__file__).parent.parent / "benchmarks" / "quality.py"


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality_benchmark", QUALITY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_run_writes_table_plot_and_json(quality, tiny_llama_dir, tmp_path, isolated_cache):
    assert quality.main(["--quick", "--model", str(tiny_llama_dir), "--out", str(tmp_path), "--threads", "1"]) == 0
    result = json.loads((tmp_path / "quality.json").read_text())
    methods = {r["method"] for r in result["rows"]}
    assert methods == set(quality.METHODS) | set(quality.ABLATIONS)
    for row in result["rows"]:
        if row["feasible"]:
            for text in quality.TEXTS:
                assert row["texts"][text]["ppl"] > 0 and 0 < row["texts"][text]["ratio"] <= 1.0 + 1e-6
    table = (tmp_path / "quality.md").read_text()
    assert "| ranapass (global) |" in table and "Total wall time" in table
    assert (tmp_path / "quality.png").stat().st_size > 10_000
    rerun_only_replaces_its_method(quality, tiny_llama_dir, tmp_path, result)


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
