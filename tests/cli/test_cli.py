"""The ``eval`` and ``demo`` commands: text and ``--json`` output, clear errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from ranapass.cli import main


def test_json_output_parses(capsys, tiny_llama_dir, text_dir):
    code = main(["eval", "--model", str(tiny_llama_dir), "--text", str(text_dir), "--windows", "3",
                 "--window-len", "16", "--batch-size", "2", "--json"])
    assert code == 0
    rep = json.loads(capsys.readouterr().out)  # exactly one JSON object on stdout
    assert rep["windows"] == 3 and rep["window_len"] == 16
    assert rep["dense"]["tokens"] == 3 * 15 and math.isfinite(rep["dense"]["ppl"])
    flops = rep["dense"]["flops_per_token"]
    assert set(flops) == {"block_linears", "lm_head", "attention", "total"}
    assert flops["total"] == pytest.approx(flops["block_linears"] + flops["lm_head"] + flops["attention"])
    assert "3 non-overlapping windows of 16 tokens" in rep["protocol"]


def test_text_output(capsys, tiny_llama_dir, text_dir):
    assert main(["eval", "--model", str(tiny_llama_dir), "--text", str(text_dir), "--windows", "2",
                 "--window-len", "8"]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "block linears" in out and "lm_head" in out


@pytest.mark.parametrize("json_flag", [False, True])
def test_too_little_text_is_a_clear_error(json_flag, capsys, tiny_llama_dir, text_dir):
    argv = ["eval", "--model", str(tiny_llama_dir), "--text", str(text_dir), "--windows", "1000"]
    assert main(argv + ["--json"] * json_flag) == 2
    captured = capsys.readouterr()
    if json_flag:
        assert "fewer or shorter windows" in json.loads(captured.out)["error"]
    else:
        assert captured.out == "" and "ranapass eval: error:" in captured.err


def test_entry_point_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "ranapass.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert all(c in out for c in ("eval", "demo", "profile", "plan", "diff"))


CALIB = ["--calib-windows", "16", "--calib-window-len", "32", "--error-weighting", "relative"]


def test_profile_plan_and_adapted_eval(capsys, tmp_path, tiny_llama_dir, text_dir, isolated_cache):
    model = ["--model", str(tiny_llama_dir), "--text", str(text_dir)]
    assert main(["profile", *model, *CALIB, "--json"]) == 0
    prof = json.loads(capsys.readouterr().out)
    assert prof["units"] > prof["sites"] > 0 and len(prof["curve"]) == 7

    out = tmp_path / "plan"
    assert main(["plan", *model, *CALIB, "--budget", "0.6", "--out", str(out), "--curve", "0.5,0.8", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["expected_ratio"] <= 0.6 and (out / "plan.json").is_file()
    assert [c["budget"] for c in plan["curve"]] == [0.5, 0.8]

    assert main(["plan", *model, *CALIB, "--no-loss-calibration", "--error-exponent", "1", "--budget", "0.6",
                 "--curve", "0.5", "--json"]) == 0
    additive = json.loads(capsys.readouterr().out)
    assert additive["expected_ratio"] <= 0.6 and additive["units"] != plan["units"]

    assert main(["eval", *model, "--windows", "3", "--window-len", "16", "--plan", str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert math.isfinite(rep["adapted"]["ppl"]) and 0 < rep["adapted"]["flop_ratio_measured"] < 1

    assert main(["eval", *model, "--windows", "2", "--window-len", "16", "--budget", "0.7", *CALIB]) == 0
    assert "adapted    budget 0.700" in capsys.readouterr().out

    recovered = tmp_path / "recovered"
    assert main(["plan", *model, *CALIB, "--budget", "0.6", "--recover", "1", "--out", str(recovered), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["meta"]["recovery"]["epochs"] == 1
    assert main(["plan", *model, *CALIB, "--budget", "0.6", "--recover", "1"]) == 0
    assert "output recovery: held-out KL " in capsys.readouterr().out
    assert main(["eval", *model, "--windows", "3", "--window-len", "16", "--plan", str(recovered), "--json"]) == 0
    assert math.isfinite(json.loads(capsys.readouterr().out)["adapted"]["ppl"])
    assert main(["plan", *model, *CALIB, "--budget", "0.6", "--bias-step", "--json"]) == 0
    step = json.loads(capsys.readouterr().out)["meta"]["bias_step"]
    assert step["searched"][0][0] == 0 and step["min_plan_kl"] > 0
    assert main(["plan", *model, *CALIB, "--budget", "0.6", "--bias-step"]) == 0
    assert "bias step: " in capsys.readouterr().out

    assert main(["plan", *model, "--data-free", "--budget", "0.7", "--json"]) == 0
    free = json.loads(capsys.readouterr().out)
    assert {u["kind"] for u in free["units"]} <= {"rank", "dense"} and free["expected_ratio"] <= 0.7

    assert main(["plan", *model, *CALIB, "--budget", "1.5"]) == 2
    assert "budget must be in (0, 1]" in capsys.readouterr().err
    assert main(["plan", *model, "--data-free", "--budget", "0.7", "--recover", "1"]) == 2
    assert "--recover needs calibration text" in capsys.readouterr().err
    assert main(["plan", *model, *CALIB, "--budget", "0.6", "--recover", "1", "--bias-step"]) == 2
    assert "give one of them" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_compiles_and_compares(capsys, tiny_llama_dir, text_dir, isolated_cache):
    assert main(["demo", "--model", str(tiny_llama_dir), "--text", str(text_dir), "--windows", "4", "--window-len",
                 "16", "--batch-size", "2", *CALIB, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["plan"]["budget"] == 0.56 and rep["units_rewritten"] > 0
    assert rep["compiled_ppl"] == pytest.approx(rep["eager_ppl"], rel=5e-3)
    assert 0 < rep["flop_ratio_measured"] < 1 and "rewrote" in rep["diff_summary"].lower()


@pytest.mark.parametrize("json_flag", [False, True])
def test_main_reports_any_ranapass_error_in_one_line(json_flag, capsys, monkeypatch):
    """``main`` catches ``RanapassError`` from any command: one line on stderr (or a JSON object), exit 2."""
    from ranapass.cli import eval as eval_cli
    from ranapass.errors import RanapassError

    def broken(args):
        raise RanapassError("the model folder is empty:\npass --model NAME")

    monkeypatch.setattr(eval_cli, "load_inputs", broken)
    assert main(["eval", "--model", "nowhere"] + ["--json"] * json_flag) == 2
    captured = capsys.readouterr()
    if json_flag:
        assert json.loads(captured.out)["error"] == "the model folder is empty:\npass --model NAME"
    else:
        assert captured.out == ""
        assert captured.err == "ranapass eval: error: the model folder is empty: pass --model NAME\n"


def test_other_exceptions_are_not_swallowed(monkeypatch):
    from ranapass.cli import eval as eval_cli

    monkeypatch.setattr(eval_cli, "load_inputs", lambda args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main(["eval", "--model", "nowhere"])
