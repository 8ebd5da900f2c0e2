"""benchmarks/bench_pipeline.py end to end on a CPU at toy size, so the GPU run is known to work first."""

import json

import pytest
from benchmark_scripts import load_benchmark

TOY = ["--model", "tiny", "--windows", "8", "--window-len", "64", "--budgets", "0.56", "--batches", "2",
       "--steps", "3", "--prompt-len", "16", "--prefill-len", "32", "--max-cache-len", "24", "48", "--repeats", "1",
       "--prefill-repeats", "2",
       "--compiler", "aot_eager"]


@pytest.fixture(scope="module")
def pipeline():
    return load_benchmark("bench_pipeline.py", "bench_pipeline")


@pytest.mark.slow
def test_toy_run_measures_every_variant(pipeline, tmp_path):
    inputs = tmp_path / "inputs"
    assert pipeline.main([*TOY, "--inputs", str(inputs), "--prepare-only"]) == {}
    assert (inputs / "windows.pt").is_file() and (inputs / "tokenizer.json").is_file()
    res = pipeline.main([*TOY, "--inputs", str(inputs), "--out", str(tmp_path / "out")])  # reads the saved inputs

    assert json.loads((tmp_path / "out" / "pipeline.json").read_text())["layers"] == 2
    assert "kind/rank mix: allocator 0.56" in (tmp_path / "out" / "pipeline.md").read_text()
    profile, *plans = res["plans"]
    assert profile["profile_seconds"] > 0 and profile["calibration"] == "8 x 64 tokens"
    assert [p["plan"] for p in plans] == ["allocator 0.56", "hand-built 0.56"]
    for plan in plans:
        assert plan["expected_ratio"] <= 0.56 + 1e-6 and 0 < plan["held_out_ratio"] < 1 and plan["mix"]
    runs = {(r["variant"], r["phase"], r["batch"], r["cache_len"]): r for r in res["runs"]}
    assert set(runs) == {(v, p, b, n) for v in ("dense", "allocator 0.56", "hand-built 0.56")
                         for p, b, n in (("decode", 2, 24), ("decode", 2, 48), ("prefill", 1, 64))}
    for (variant, phase, _, _), r in runs.items():
        assert r["tok_per_s"] > 0 and r["recompiles"] == 0 and r["graph_breaks"] == 0
        assert r["decode_graphs"] == (phase == "decode") and r["prefill_graphs"] == 1
        if phase.startswith("prefill"):
            assert 0 < r["launch_ms"] <= r["ms"]
        assert r["speedup"] == 1.0 if variant == "dense" else r["speedup"] > 0
        assert ("decoded_ratio" in r) == (variant != "dense" and phase == "decode")
        if "decoded_ratio" in r:
            assert 0 < r["decoded_ratio"] <= 1.0 + 1e-6
