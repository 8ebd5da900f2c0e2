"""Graph-diff inspection: the table, the unified diff and the HTML page; the CLI; no effect on a later compile."""

from __future__ import annotations

import json

import pytest
import torch
from plans import build_plan, fresh_dynamo, logits, tiny_inputs, tiny_model  # noqa: F401 (fixture)

import ranapass
from ranapass.backend import RanaBackend, unrewritten_units
from ranapass.cli import main
from ranapass.diff import diff
from ranapass.models import load_model

pytestmark = pytest.mark.usefixtures("fresh_dynamo")
ARCH = "LlamaForCausalLM"


@pytest.fixture
def attached():
    model, inputs = tiny_model(ARCH), tiny_inputs(ARCH)
    plan = build_plan(model, inputs)
    ranapass.attach(model, plan)
    return model, inputs, plan


def test_table_has_one_row_per_unit_and_dense_linear(attached):
    model, inputs, plan = attached
    d = diff(model, inputs)

    rows = d.rows()
    assert [r["module"] for r in rows] == [u.name for u in plan.adapted] + ["lm_head"]
    qkv = rows[0]
    assert qkv["old_op"] == "torch._C._nn.linear x3" and qkv["new_op"] == "ranapass.rank_adapter"
    assert qkv["nB"] == plan.adapted[0].adapter.rank and qkv["expected_kept"] == plan.adapted[0].expected_kept
    assert qkv["flops_before"] == plan.adapted[0].dense_flops and qkv["flops_after"] == plan.adapted[0].flops()
    assert rows[-1]["new_op"] == "dense (no adapter)"
    assert d.unrewritten == []
    assert "rewrote 8 unit(s): 14 linear(s) -> 8 ranapass op(s)" in d.summary()
    assert "model.layers.1.mlp.down_proj" in d.table()


def test_unified_diff_shows_only_the_rewrite(attached):
    model, inputs, plan = attached
    text = diff(model, inputs).unified()
    removed = [line for line in text.splitlines() if line.startswith("-") and not line.startswith("---")]
    added = [line for line in text.splitlines() if line.startswith("+") and not line.startswith("+++")]

    # 14 linears go, plus each gated MLP's activation and mul (fused into the down projection's op).
    assert sum("torch._C._nn.linear" in line for line in removed) == 14
    assert len(removed) == 14 + 2 * 2
    # 8 ops come, plus one slice per member of the grouped units (q, k, v and gate, up, twice).
    assert sum("torch.ops.ranapass." in line for line in added) == 8
    assert len(added) == 8 + 2 * (3 + 2)
    assert "weight" in removed[0] and "model.layers.0.self_attn.q_proj.weight" in text  # weights by name


def test_html_and_dict(attached):
    model, inputs, _ = attached
    d = diff(model, inputs)
    page = d.to_html()
    assert page.startswith("<!DOCTYPE html>") and page.count("<tr>") == 1 + 9 and 'class="add"' in page
    data = d.to_dict()
    json.dumps(data)
    assert data["units_rewritten"] == 8 and data["ops"] == 8 and data["unrewritten_units"] == []


def test_diff_does_not_disturb_a_later_compile(attached):
    model, inputs, plan = attached
    diff(model, inputs)
    backend = RanaBackend(compiler="eager")
    with torch.no_grad(), ranapass.attach(model, plan).eager():
        ref = logits(model, inputs)
    with torch.no_grad():
        out = logits(torch.compile(model, backend=backend), inputs)
    assert len(backend.reports) == 1 and backend.reports[0].rewritten == len(plan.adapted)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_units_a_traced_submodule_never_reaches_are_named(attached):
    model, _, plan = attached
    d = diff(model.model.layers[1].mlp, torch.randn(2, 12, 64))  # only the second layer's MLP is traced
    assert [r["module"] for r in d.rows()] == ["model.layers.1.mlp.{gate_proj,up_proj}",
                                               "model.layers.1.mlp.down_proj"]
    assert d.unrewritten is None  # the plan is attached to the whole model, not to this module
    missing = unrewritten_units(model, [g.report for g in d.graphs])
    assert missing == [u.name for u in plan.adapted if ".layers.1.mlp." not in u.name]


def test_cli_with_a_saved_plan_writes_html_and_prints_json(tmp_path, capsys, tiny_llama_dir):
    model, _ = load_model(str(tiny_llama_dir))
    plan = build_plan(model, torch.randint(0, model.config.vocab_size, (2, 16)))
    plan.save(tmp_path / "plan")
    args = ["diff", "--model", str(tiny_llama_dir), "--plan", str(tmp_path / "plan"), "--tokens", "8"]

    out = tmp_path / "diff.html"
    assert main([*args, "--out", str(out), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["units_rewritten"] == len(plan.adapted) and payload["out"] == str(out)
    assert out.read_text().startswith("<!DOCTYPE html>")

    assert main(args) == 0
    text = capsys.readouterr().out
    assert "ranapass.rank_adapter" in text and "+++ graph 0: after ranapass" in text


def test_cli_plans_from_the_profile_by_default(capsys, tiny_llama_dir, text_dir, isolated_cache):
    calib = ["--calib-windows", "16", "--calib-window-len", "32", "--error-weighting", "relative"]
    assert main(["diff", "--model", str(tiny_llama_dir), "--text", str(text_dir), *calib, "--budget", "0.6",
                 "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["units_rewritten"] > 0 and payload["unrewritten_units"] == []


def test_cli_missing_plan_is_a_clear_error(capsys, tiny_llama_dir, tmp_path):
    assert main(["diff", "--model", str(tiny_llama_dir), "--plan", str(tmp_path / "nowhere")]) == 2
    assert "holds no plan.json" in capsys.readouterr().err
