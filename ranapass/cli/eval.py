"""``ranapass eval``: perplexity and linear FLOPs per token of a model, on the evaluation protocol.

The defaults are the protocol of :mod:`ranapass.evaluate`; the options change the model, the text
and the number and length of windows, and the printed protocol line says what was run.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from ranapass.cost_model import dense_flops, per_token_at
from ranapass.data import load_texts, token_windows
from ranapass.cli._shared import (
    add_objective_args,
    add_json_flag,
    add_model_args,
    add_profile_args,
    check_args,
    emit,
    load_profile,
    model_from_args,
    plan_from_args,
)
from ranapass.evaluate import EVAL_NUM_WINDOWS, EVAL_SOURCE, EVAL_WINDOW, adapted_perplexity, perplexity, protocol
from ranapass.models import DEFAULT_MODEL
from ranapass.plan import Plan
from ranapass.plan_check import check_plan_fits

__all__ = ["register", "add_model_text_args", "load_inputs", "evaluate_dense", "evaluate_adapted", "report",
           "format_report", "format_adapted"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval", help="perplexity and linear FLOPs per token, dense and adapted",
        description="Perplexity and linear FLOPs per token of a model, dense and (with --budget or --plan) "
                    "adapted, with FLOPs measured from the real masks. The defaults are the evaluation "
                    "protocol (ranapass/evaluate.py); the options change the model, the text and the "
                    "windows, and the printed protocol line says what was run.")
    add_model_text_args(parser)
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (speed only)")
    parser.add_argument("--budget", type=float, default=None,
                        help="also evaluate the model adapted at this FLOP budget (profiled on --calib-text)")
    parser.add_argument("--allocation", choices=("global", "uniform"), default="global",
                        help="global (one allocation over all layers) or uniform (the reference's recipe)")
    parser.add_argument("--kinds", default="rank,neuron", help="candidate families (rank, lowrank, neuron)")
    add_objective_args(parser)
    parser.add_argument("--plan", default=None, help="evaluate a saved plan (directory) instead of --budget")
    parser.add_argument("--calib-text", default="python-docs", help="calibration source for --budget")
    add_profile_args(parser)
    add_json_flag(parser)
    parser.set_defaults(func=run)


def add_model_text_args(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--device``, ``--dtype``, ``--text``, ``--windows``, ``--window-len`` with the protocol's
    defaults."""
    add_model_args(parser, f"{DEFAULT_MODEL!r} (default), a Hugging Face id, a local folder or a .gguf file")
    parser.add_argument("--text", default=EVAL_SOURCE,
                        help="python-docs (default), debian-handbook, a text file or folder, a datasets "
                             "save_to_disk folder, or hf:NAME[:CONFIG]; its evaluation split is used")
    parser.add_argument("--windows", type=int, default=EVAL_NUM_WINDOWS, help="number of windows")
    parser.add_argument("--window-len", type=int, default=EVAL_WINDOW, help="tokens per window")


def load_inputs(args: argparse.Namespace) -> tuple[torch.nn.Module, Any, torch.Tensor]:
    """The model, its tokenizer and the evaluation windows the arguments name."""
    model, tokenizer = model_from_args(args)
    windows = token_windows(tokenizer, load_texts(args.text, "evaluation"), args.window_len, args.windows)
    return model, tokenizer, windows


def evaluate_dense(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 4) -> dict[str, Any]:
    """Perplexity of the dense model on ``windows`` and its FLOPs per token (attention over the window)."""
    start = time.perf_counter()
    result = perplexity(model, windows, batch_size)
    return {
        "ppl": result.ppl,
        "nll": result.nll,
        "tokens": result.tokens,
        "seconds": round(time.perf_counter() - start, 2),
        "flops_per_token": per_token_at(dense_flops(model), seq_len=windows.shape[1]),
    }


def report(args: argparse.Namespace, model: torch.nn.Module, windows: torch.Tensor) -> dict[str, Any]:
    """What ``eval`` prints: the run's description and the dense evaluation."""
    return {
        "model": args.model,
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": str(next(model.parameters()).device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "text": args.text,
        "windows": windows.shape[0],
        "window_len": windows.shape[1],
        "protocol": protocol(args.text, windows.shape[0], windows.shape[1]),
        "dense": evaluate_dense(model, windows, args.batch_size),
    }


def evaluate_adapted(args: argparse.Namespace, model: torch.nn.Module, tokenizer, windows: torch.Tensor) -> dict[str, Any]:
    """Perplexity and *measured* FLOPs of the adapted model (``--budget`` or ``--plan``)."""
    if args.plan:
        plan = Plan.load(args.plan)
    else:
        calib = argparse.Namespace(**{**vars(args), "text": args.calib_text})
        plan = plan_from_args(args, load_profile(calib, model, tokenizer)[0])
    start = time.perf_counter()
    result = adapted_perplexity(model, plan, windows, args.batch_size)
    dense_linears = plan.dense_flops()
    return {
        "budget": plan.budget,
        "allocation": plan.allocation,
        "ppl": result.perplexity.ppl,
        "nll": result.perplexity.nll,
        "tokens": result.perplexity.tokens,
        "seconds": round(time.perf_counter() - start, 2),
        "flop_ratio_measured": result.flop_ratio,
        "flop_ratio_expected": result.expected_ratio,
        "block_linear_flops_per_token": result.flops_per_token,
        "dense_block_linear_flops_per_token": dense_linears,
        "units_adapted": len(plan.adapted),
        "units": len(plan.units),
        "thresholds": plan.meta.get("thresholds"),
    }


def _mflop(x: float) -> str:
    return f"{x / 1e6:10.2f} MFLOP"


def format_report(rep: dict[str, Any]) -> str:
    """The readable form of :func:`report`'s dict."""
    dense = rep["dense"]
    flops = dense["flops_per_token"]
    return "\n".join([
        f"model      {rep['model']} ({rep['architecture']}, {rep['parameters'] / 1e6:.1f}M parameters, "
        f"{rep['dtype']} on {rep['device']})",
        f"protocol   {rep['protocol']}",
        f"perplexity {dense['ppl']:.4f} (dense; mean NLL {dense['nll']:.5f} nats over {dense['tokens']} "
        f"tokens, {dense['seconds']:.1f} s)",
        f"FLOPs per token, dense (attention over S={rep['window_len']} keys):",
        f"  block linears {_mflop(flops['block_linears'])}",
        f"  lm_head       {_mflop(flops['lm_head'])}",
        f"  attention     {_mflop(flops['attention'])}",
        f"  total         {_mflop(flops['total'])}",
    ])


def format_adapted(rep: dict[str, Any], dense: dict[str, Any]) -> str:
    """The readable form of :func:`evaluate_adapted`'s dict, next to the dense figures."""
    return "\n".join([
        f"adapted    budget {rep['budget']:.3f} ({rep['allocation']} allocation, {rep['units_adapted']}/{rep['units']} "
        f"units adapted; thresholds from {rep['thresholds']})",
        f"perplexity {rep['ppl']:.4f} adapted vs {dense['ppl']:.4f} dense "
        f"({(rep['ppl'] / dense['ppl'] - 1) * 100:+.2f}%; {rep['seconds']:.1f} s)",
        f"block-linear FLOPs per token: {rep['block_linear_flops_per_token'] / 1e6:.2f} M measured vs "
        f"{rep['dense_block_linear_flops_per_token'] / 1e6:.2f} M dense: ratio {rep['flop_ratio_measured']:.4f} "
        f"measured on these windows (expected {rep['flop_ratio_expected']:.4f})",
    ])


def run(args: argparse.Namespace) -> int:
    plan = check_args(args)
    model, tokenizer, windows = load_inputs(args)
    if plan is not None:
        check_plan_fits(model, plan)
    rep = report(args, model, windows)
    text = format_report(rep)
    if args.budget is not None or args.plan:
        rep["adapted"] = evaluate_adapted(args, model, tokenizer, windows)
        text += "\n" + format_adapted(rep["adapted"], rep["dense"])
    emit(args, rep, text)
    return 0
