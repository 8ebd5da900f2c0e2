"""``ranapass demo``: the README's main job on the offline defaults.

Profile SmolLM2-135M-Instruct on the calibration split of the Python docs (cached after the first
run), plan at budget 0.56, compile the model with the ranapass backend, and print dense vs eager and
compiled adapted perplexity on the evaluation protocol, the measured FLOPs and a graph-diff summary.
"""

from __future__ import annotations

import argparse
import time

from ranapass.cli import eval as eval_cli
from ranapass.cli._shared import (add_json_flag, add_plan_args, add_profile_args, check_args, emit, load_profile,
                                  plan_from_args)
from ranapass.compiled_eval import compare_compiled
from ranapass.cost_model import dense_flops, per_token_at
from ranapass.evaluate import protocol


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="profile, plan at 0.56, compile, evaluate SmolLM2 (offline)",
        description="Profile SmolLM2-135M-Instruct (cached), plan at a FLOP budget, compile it with the ranapass "
                    "backend and compare dense, eager adapted and compiled adapted perplexity on the "
                    "evaluation protocol, with measured FLOPs and a graph-diff summary.")
    eval_cli.add_model_text_args(parser)
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (speed only)")
    add_profile_args(parser)
    add_plan_args(parser)
    add_json_flag(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_args(args)
    model, tokenizer, windows = eval_cli.load_inputs(args)
    prof, profile_seconds = load_profile(args, model, tokenizer)
    start = time.perf_counter()
    plan = plan_from_args(args, prof)
    plan_seconds = time.perf_counter() - start
    result = compare_compiled(model, plan, windows, batch_size=args.batch_size)
    flops = per_token_at(dense_flops(model), seq_len=windows.shape[1])
    kinds = {}
    for unit in plan.units:
        kinds[unit.kind] = kinds.get(unit.kind, 0) + 1
    payload = {
        "model": args.model, "protocol": protocol(args.text, windows.shape[0], windows.shape[1]),
        "profile": {"seconds": round(profile_seconds, 1), "meta": prof.meta},
        "plan": {"budget": plan.budget, "allocation": plan.allocation, "seconds": round(plan_seconds, 2),
                 "expected_ratio": plan.expected_ratio(), "kinds": kinds},
        "dense_ppl": result.dense_ppl, "eager_ppl": result.eager_ppl, "compiled_ppl": result.compiled_ppl,
        "flop_ratio_measured": result.flop_ratio_measured, "flop_ratio_expected": result.flop_ratio_expected,
        "dense_flops_per_token": flops, "graphs": result.graphs, "units_rewritten": result.units_rewritten,
        "diff_summary": result.diff_summary,
    }
    text = "\n".join([
        f"ranapass demo: {args.model}",
        f"protocol   {payload['protocol']}",
        f"profile    {prof.meta.get('data')}, {prof.meta.get('error_weighting')} error weighting "
        f"(calibrated in {prof.meta.get('profile_seconds')} s; loaded in {profile_seconds:.1f} s)",
        f"plan       budget {plan.budget} ({plan.allocation}) in {plan_seconds:.1f} s: "
        + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())),
        f"dense FLOPs per token: block linears {flops['block_linears'] / 1e6:.2f} M, lm_head "
        f"{flops['lm_head'] / 1e6:.2f} M, attention {flops['attention'] / 1e6:.2f} M (S={windows.shape[1]})",
        result.format(),
    ])
    emit(args, payload, text)
    return 0
