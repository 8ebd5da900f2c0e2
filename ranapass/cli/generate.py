"""``ranapass generate``: complete a prompt with the dense and the adapted model, compiled the same way.

Both runs go through ``CompiledGenerator`` (compiled prefill and decode over one static cache, greedy):
the dense model through the backend's compiler alone, the adapted one through the ranapass backend.
Each is warmed up first (that compiles both phases and, on a GPU, runs the decode step twice: CUDA graphs
are recorded on a graph's second call, which must not be timed) and then timed; the completions and
tokens per second are printed side by side.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import sys
import time
from typing import Any

import torch

from ranapass.attach import attach, detach
from ranapass.backend import COMPILERS, RanaBackend, rana_backend
from ranapass.cli._shared import (add_json_flag, add_model_calibration_args, add_plan_args, check_args, emit,
                                  load_profile, model_from_args, plan_from_args)
from ranapass.errors import RanapassError
from ranapass.generation import CompiledGenerator
from ranapass.plan_check import check_plan_fits

__all__ = ["register"]

DEFAULT_BUDGET = 0.56
PROGRESS_AFTER_S = 2.0  # runs shorter than this print no progress line
WARMUP_TOKENS = 3  # a prefill and two decode steps: compile, then CUDA graphs' warm-up run and recording


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate", help="complete a prompt, dense and adapted, with tokens per second",
        description=__doc__.splitlines()[0] + " The plan is a saved one (--plan) or made at --budget "
                    f"(default {DEFAULT_BUDGET}) from the model's cached profile.")
    parser.add_argument("prompt", help="the text to complete")
    add_model_calibration_args(parser)
    add_plan_args(parser)
    parser.set_defaults(budget=None)
    parser.add_argument("--plan", default=None, help="a saved plan (directory) instead of --budget")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (fewer at end of text)")
    parser.add_argument("--compiler", choices=COMPILERS, default="inductor",
                        help="what compiles both models' graphs: inductor (the product, default), or aot_eager / "
                             "eager, which check the rewrite and the completions without Inductor's compile time "
                             "(and without CUDA graphs); their tokens per second are not the product's")
    add_json_flag(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.plan and args.budget is not None:
        raise RanapassError("give --budget or --plan, not both")
    if args.max_new_tokens < 1:
        raise RanapassError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    plan = check_args(args)
    model, tokenizer = model_from_args(args)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise RanapassError("the prompt is empty: give some text to complete")
    if plan is not None:
        check_plan_fits(model, plan)
    else:
        args.budget = DEFAULT_BUDGET if args.budget is None else args.budget
        plan = plan_from_args(args, load_profile(args, model, tokenizer)[0])
    detach(model)
    backend = dataclasses.replace(rana_backend, compiler=args.compiler)
    dense = _generate(model, tokenizer, ids, args.max_new_tokens, "dense", backend)
    attach(model, plan)
    adapted = _generate(model, tokenizer, ids, args.max_new_tokens, "adapted", backend)
    detach(model)
    kinds = collections.Counter(u.kind for u in plan.units)
    payload = {
        "model": args.model, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "compiler": args.compiler, "prompt": args.prompt, "prompt_tokens": ids.shape[1], "max_new_tokens": args.max_new_tokens,
        "plan": {"source": args.plan or "profile", "budget": plan.budget, "allocation": plan.allocation,
                 "expected_ratio": plan.expected_ratio(), "units_adapted": len(plan.adapted),
                 "units": len(plan.units), "kinds": dict(kinds)},
        "dense": dense, "adapted": adapted,
        "decode_speedup": adapted["decode_tokens_per_s"] / dense["decode_tokens_per_s"],
    }
    emit(args, payload, _format(payload))
    return 0


def _generate(model: torch.nn.Module, tokenizer, ids: torch.Tensor, max_new_tokens: int, label: str,
              backend: RanaBackend) -> dict[str, Any]:
    """Warm up (compile) then time one greedy completion of ``ids``: the completion and its figures."""
    gen = CompiledGenerator(model, max_cache_len=ids.shape[1] + max_new_tokens, backend=backend,
                            decode_mode="auto" if backend.compiler == "inductor" else None)
    start = time.perf_counter()
    gen.generate(ids, min(WARMUP_TOKENS, max_new_tokens))
    compile_seconds = time.perf_counter() - start
    progress = _Progress(label, max_new_tokens)
    try:
        out = gen.generate(ids, max_new_tokens, eos_token_id=tokenizer.eos_token_id, progress=progress)
    finally:
        progress.close()
    timing = gen.last_timing
    return {"completion": tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True),
            "new_tokens": timing.new_tokens,
            "tokens_per_s": timing.new_tokens / (timing.prefill_seconds + timing.decode_seconds),
            "decode_tokens_per_s": timing.decode_tokens_per_s, "prefill_seconds": timing.prefill_seconds,
            "decode_seconds": timing.decode_seconds, "compile_seconds": compile_seconds,
            "graphs": gen.compilations}


class _Progress:
    """A progress line on stderr, once a run has taken ``PROGRESS_AFTER_S``, rewritten at most once a second."""

    def __init__(self, label: str, total: int):
        self.label, self.total = label, total
        self.start = self.shown = time.perf_counter()
        self.printed = False

    def __call__(self, done: int) -> None:
        now = time.perf_counter()
        if now - self.start >= PROGRESS_AFTER_S and now - self.shown >= 1.0:
            print(f"\r{self.label}: {done}/{self.total} tokens, {done / (now - self.start):.1f} tok/s",
                  end="", file=sys.stderr, flush=True)
            self.shown, self.printed = now, True

    def close(self) -> None:
        if self.printed:
            print(file=sys.stderr, flush=True)


def _format(p: dict[str, Any]) -> str:
    plan = p["plan"]
    lines = [f"ranapass generate: {p['model']} on {p['device']} ({p['dtype']}, {p['compiler']}); plan at budget "
             f"{plan['budget']} ({plan['allocation']}): {plan['units_adapted']}/{plan['units']} units adapted, "
             f"expected FLOP ratio {plan['expected_ratio']:.4f}",
             f"prompt ({p['prompt_tokens']} tokens): {p['prompt']}", "",
             f"{'':8} {'new tokens':>10} {'tok/s':>9} {'decode tok/s':>13} {'prefill s':>10} {'compile s':>10}"]
    for label in ("dense", "adapted"):
        r = p[label]
        lines.append(f"{label:8} {r['new_tokens']:>10} {r['tokens_per_s']:>9.1f} {r['decode_tokens_per_s']:>13.1f} "
                     f"{r['prefill_seconds']:>10.3f} {r['compile_seconds']:>10.1f}")
    lines.append(f"adapted decodes {p['decode_speedup']:.2f}x as fast as dense")
    for label in ("dense", "adapted"):
        lines += ["", f"--- {label}:", p[label]["completion"]]
    return "\n".join(lines)
