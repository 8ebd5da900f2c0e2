"""benchmarks/calibration_spread.py at toy size: prepare, run every replica and variant, report; and its math."""

import json
import math

import numpy as np
import pytest
from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def spread():
    return load_benchmark("calibration_spread.py", "calibration_spread_benchmark")


@pytest.mark.slow
def test_toy_run_measures_every_replica_variant_and_plan(spread, tiny_llama_dir, tmp_path, isolated_cache):
    prepared, out = tmp_path / "prepared", tmp_path / "out"
    assert spread.main(["prepare", "--out", str(prepared), "--replicas", "2", "--windows", "6", "--window", "128",
                        "--model", str(tiny_llama_dir)]) == 0
    args = ["run", "--prepared", str(prepared), "--out", str(out), "--model", str(tiny_llama_dir), "--threads", "1",
            "--variant", "default", "g1:gradient_windows=1,sample_tokens=256",
            "--plan", "0.56", "0.8:first_order=False"]
    assert spread.main(args) == 0
    rows = [json.loads(line) for line in (out / spread.RESULTS_FILE).read_text().splitlines()]
    dense = [r for r in rows if r["kind"] == "dense"]
    plans = [r for r in rows if r["kind"] == "plan"]
    assert {r["text"] for r in dense} == set(spread.TEXTS)
    assert {(r["replica"], r["variant"], r["plan"], r["budget"], r["text"]) for r in plans} == {
        (rep, v, p, b, t) for rep in ("protocol", "draw0", "draw1") for v in ("default", "g1")
        for p, b in (("default", 0.56), ("first_order=False", 0.8)) for t in spread.TEXTS}
    for r in plans:
        assert len(r["window_nll"]) == spread.TEXTS[r["text"]] and 0 < r["ratio"] <= 1 + 1e-6
        assert r["ppl"] == pytest.approx(math.exp(np.mean(r["window_nll"])), rel=1e-9)
    table = spread.report(spread.read(out / spread.RESULTS_FILE))
    assert table.count("| g1 | default |") == 2 and table.count("| default | first_order=False |") == 2
    assert "**Budget 0.56, python-docs**" in table


def test_replicas_are_disjoint_draws_of_the_pool(spread):
    import torch

    pool = torch.arange(12).reshape(12, 1)
    draws = spread.replicas({"protocol": pool[:4], "pool": pool}, 3)
    assert list(draws) == ["protocol", "draw0", "draw1", "draw2"]
    assert [d[1] for d in draws.values()] == [0, 0, 1, 2]
    seen = torch.cat([draws[f"draw{k}"][0] for k in range(3)]).flatten().tolist()
    assert sorted(seen) == list(range(12)) and draws["draw1"][0].flatten().tolist() == [1, 4, 7, 10]


def test_report_pairs_each_variant_by_replica(spread):
    dense = [0.0, 0.0, 0.0, 0.0]
    rows = [{"kind": "dense", "text": "t", "window_nll": dense}]
    for rep, base, other in (("a", 0.10, 0.12), ("b", 0.12, 0.13), ("c", 0.11, 0.14)):
        for variant, level in (("default", base), ("x", other)):
            rows.append({"kind": "plan", "variant": variant, "plan": "default", "replica": rep, "budget": 0.5,
                         "text": "t", "ratio": 0.5, "window_nll": [level] * 4})
    table = spread.report(rows)
    line = next(x for x in table.splitlines() if x.startswith("| x |"))
    diffs = np.array([0.02, 0.01, 0.03])
    expected = f"{100 * math.expm1(diffs.mean()):+.2f}% ± {100 * diffs.std(ddof=1) / math.sqrt(3):.2f}% (3)"
    assert line.endswith(f"| {expected} |")
    base = np.array([0.10, 0.12, 0.11])
    mean = np.mean([math.expm1(v) for v in base])
    assert f"| {100 * mean:+.2f}% |" in next(x for x in table.splitlines() if x.startswith("| default |"))


def test_specs_are_checked_before_any_work(spread):
    from ranapass.planning import PlanOptions
    from ranapass.profiling import ProfileOptions

    assert spread.parse_spec("g30:gradient_windows=30", ProfileOptions) == ("g30", {"gradient_windows": 30})
    assert spread.parse_spec("0.7:first_order=False", PlanOptions) == ("0.7", {"first_order": False})
    assert spread.parse_spec("p:loss_probe_kept=(0.35,0.5),seed=1", ProfileOptions) == (
        "p", {"loss_probe_kept": (0.35, 0.5), "seed": 1})
    with pytest.raises(SystemExit, match="field=value"):
        spread.parse_spec("x:seed=3", ProfileOptions, reserved=("seed",))
    with pytest.raises(SystemExit, match="field=value"):
        spread.parse_spec("x:no_such=1", ProfileOptions)
    with pytest.raises(Exception, match="error_weighting"):
        spread.parse_spec("x:error_weighting='neither'", ProfileOptions)


def test_read_skips_a_cut_last_line_and_refuses_a_damaged_one(spread, tmp_path):
    good = json.dumps({"kind": "dense", "text": "t", "window_nll": [1.0]})
    path = tmp_path / "r.jsonl"
    path.write_text(good + "\n" + good[:10])
    assert len(spread.read(path)) == 1
    path.write_text(good[:10] + "\n" + good + "\n")
    with pytest.raises(SystemExit, match="line 1"):
        spread.read(path)
