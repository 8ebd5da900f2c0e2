"""benchmarks/profile_speed.py end to end on a CPU at toy size (random weights, 8 windows of 64 tokens)."""

import json

import pytest
from benchmark_scripts import load_benchmark


@pytest.mark.slow
def test_toy_run_times_the_stages_and_replay_keeps_the_scales(tmp_path):
    pipeline = load_benchmark("bench_pipeline.py", "bench_pipeline")
    speed = load_benchmark("profile_speed.py", "profile_speed")
    inputs = tmp_path / "inputs"
    pipeline.main(["--model", "tiny", "--windows", "8", "--window-len", "64", "--prefill-len", "64",
                   "--batches", "1", "--inputs", str(inputs), "--prepare-only"])
    res = speed.main(["--model", "tiny", "--windows", "8", "--inputs", str(inputs), "--compare-replay",
                      "--out", str(tmp_path / "out")])
    assert json.loads((tmp_path / "out" / "profile_speed.json").read_text())["windows"] == [8, 64]
    assert {"statistics", "candidates", "loss_calibration"} <= set(res["timings"])
    assert set(res["plan_seconds"]) == {"0.56", "0.7"} and all(t > 0 for ts in res["plan_seconds"].values() for t in ts)
    assert res["replay_gives_the_same_scales"]
    assert res["replayed_blocks_replay"] == 1 and res["replayed_blocks_whole"] == 0   # layer 0, before layer 1
