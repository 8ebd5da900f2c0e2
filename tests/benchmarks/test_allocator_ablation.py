"""benchmarks/allocator_ablation.py: its table shows every method's paired differences as computed."""

import pytest
from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def ablation():
    return load_benchmark("allocator_ablation.py", "allocator_ablation")


def test_measures_every_budget_from_0_4_to_0_9_and_both_teal_rows(ablation):
    assert sorted(ablation.BUDGETS) == [0.4, 0.5, 0.56, 0.6, 0.7, 0.8, 0.9]
    assert {ablation.TEAL, ablation.TEAL_GREEDY, ablation.DEFAULT, ablation.TWO_LEVELS} <= set(ablation.METHODS)


def test_report_shows_the_paired_differences(ablation):
    from quality import paired

    dense, default, teal, greedy = [2.0, 2.5, 3.0, 2.2], [2.02, 2.51, 3.01, 2.23], [2.1, 2.55, 3.2, 2.25], \
        [2.02, 2.51, 3.01, 2.235]
    rows = {}
    for name, nll in ((ablation.DEFAULT, default), (ablation.TEAL, teal), (ablation.TEAL_GREEDY, greedy)):
        rows[name] = {"docs": {"ppl": 10.0 + nll[0], "ratio": 0.56, "window_nll": nll, "vs_default": paired(nll, default)}}
    rows[ablation.DEFAULT]["docs"]["vs_dense"] = paired(default, dense)
    rows[ablation.DEFAULT]["plan_seconds"] = 2.5
    res = {"dense": {"docs": {"ppl": 9.0}}, "rows": {"0.9": rows, "0.56": rows}, "seconds": {"probes": 61.0}}
    table = ablation.report(res)
    assert "Dense: docs 9.00." in table
    lines = table.splitlines()
    assert lines.index(next(x for x in lines if x.startswith("| 0.56 |"))) < \
        lines.index(next(x for x in lines if x.startswith("| 0.9 |")))  # budgets rising
    teal_line = next(x for x in lines if x.startswith(f"| 0.56 | {ablation.TEAL} |"))
    expected = paired(teal, default)
    assert f"{100 * expected['rel_ppl_diff']:+.2f} ± {100 * expected['rel_se']:.2f}% (higher)" in teal_line
    assert "| 12.10 (0.560) |" in teal_line
    default_line = next(x for x in lines if x.startswith(f"| 0.56 | {ablation.DEFAULT} |"))
    vs_dense = paired(default, dense)
    assert f"{100 * vs_dense['rel_ppl_diff']:+.2f} ± {100 * vs_dense['rel_se']:.2f}%" in default_line
    assert f"- 0.9, docs: lowest {ablation.DEFAULT} ({ablation.TEAL}: higher, {ablation.TEAL_GREEDY}: tie)" in table
    assert "probes 61" in table and "0.9 2.5" in table


def test_results_are_written_whole(ablation, tmp_path):
    res = {"dense": {"docs": {"ppl": 9.0}}, "rows": {}}
    ablation.write_results(tmp_path, "allocator_ablation", res, ablation.report(res))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["allocator_ablation.json", "allocator_ablation.md"]


def test_help_lists_the_methods(ablation, capsys):
    with pytest.raises(SystemExit):
        ablation.main(["--help"])
    assert "ranapass (probes at 50%, default)" in capsys.readouterr().out


@pytest.mark.slow
def test_toy_run_from_prepared_windows(ablation, tiny_llama_dir, tmp_path, isolated_cache):
    spread = load_benchmark("calibration_spread.py", "calibration_spread_benchmark")
    prepared, out = tmp_path / "prepared", tmp_path / "out"
    assert spread.main(["prepare", "--out", str(prepared), "--replicas", "1", "--windows", "6", "--window", "128",
                        "--model", str(tiny_llama_dir)]) == 0
    res = ablation.main(["--prepared", str(prepared), "--model", str(tiny_llama_dir), "--out", str(out),
                         "--threads", "1", "--budgets", "0.7", "--methods", ablation.TEAL, ablation.TEAL_GREEDY])
    rows = res["rows"]["0.7"]
    assert set(rows) == {ablation.DEFAULT, ablation.TEAL, ablation.TEAL_GREEDY}
    for row in rows.values():
        for text, count in spread.TEXTS.items():
            assert len(row[text]["window_nll"]) == count and 0 < row[text]["ratio"] <= 1 + 1e-6
    assert res["device"] == "cpu" and (out / "allocator_ablation.md").is_file()
