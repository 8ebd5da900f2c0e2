"""``ranapass eval``: perplexity and linear FLOPs per token of a model, on the evaluation protocol.

The defaults are the protocol of :mod:`ranapass.evaluate`; the options change the model, the text
and the number and length of windows, and the printed protocol line says what was run.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

import torch

from ranapass.cli._output import add_json_flag, emit
from ranapass.cost_model import dense_flops, per_token_at
from ranapass.data import TextSourceError, load_texts, token_windows
from ranapass.evaluate import EVAL_NUM_WINDOWS, EVAL_SOURCE, EVAL_WINDOW, perplexity, protocol
from ranapass.models import DEFAULT_MODEL, ModelLoadError, load_model

__all__ = ["register", "add_model_text_args", "load_inputs", "evaluate_dense", "report", "format_report", "fail"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval", help="perplexity and linear FLOPs per token",
        description="Perplexity and linear FLOPs per token of a model. The defaults are the evaluation "
                    "protocol (ranapass/evaluate.py); the options change the model, the text and the "
                    "windows, and the printed protocol line says what was run.")
    add_model_text_args(parser)
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (speed only)")
    add_json_flag(parser)
    parser.set_defaults(func=run)


def add_model_text_args(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--text``, ``--windows``, ``--window-len`` with the protocol's defaults."""
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"{DEFAULT_MODEL!r} (default), a Hugging Face id, a local folder or a .gguf file")
    parser.add_argument("--text", default=EVAL_SOURCE,
                        help="python-docs (default), debian-handbook, a text file or folder, a datasets "
                             "save_to_disk folder, or hf:NAME[:CONFIG]; its evaluation split is used")
    parser.add_argument("--windows", type=int, default=EVAL_NUM_WINDOWS, help="number of windows")
    parser.add_argument("--window-len", type=int, default=EVAL_WINDOW, help="tokens per window")


def load_inputs(args: argparse.Namespace) -> tuple[torch.nn.Module, Any, torch.Tensor]:
    """The model, its tokenizer and the evaluation windows the arguments name."""
    model, tokenizer = load_model(args.model)
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
        "text": args.text,
        "windows": windows.shape[0],
        "window_len": windows.shape[1],
        "protocol": protocol(args.text, windows.shape[0], windows.shape[1]),
        "dense": evaluate_dense(model, windows, args.batch_size),
    }


def _mflop(x: float) -> str:
    return f"{x / 1e6:10.2f} MFLOP"


def format_report(rep: dict[str, Any]) -> str:
    """The readable form of :func:`report`'s dict."""
    dense = rep["dense"]
    flops = dense["flops_per_token"]
    return "\n".join([
        f"model      {rep['model']} ({rep['architecture']}, {rep['parameters'] / 1e6:.1f}M parameters)",
        f"protocol   {rep['protocol']}",
        f"perplexity {dense['ppl']:.4f} (dense; mean NLL {dense['nll']:.5f} nats over {dense['tokens']} "
        f"tokens, {dense['seconds']:.1f} s)",
        f"FLOPs per token, dense (attention over S={rep['window_len']} keys):",
        f"  block linears {_mflop(flops['block_linears'])}",
        f"  lm_head       {_mflop(flops['lm_head'])}",
        f"  attention     {_mflop(flops['attention'])}",
        f"  total         {_mflop(flops['total'])}",
    ])


def fail(args: argparse.Namespace, error: Exception) -> int:
    """Report a user-fixable error (missing model or text, too little text): a JSON object with
    ``--json``, else one line on stderr; exit status 2. ``-v`` also logs the traceback."""
    logging.getLogger(__name__).debug("%s failed", args.command, exc_info=error)
    if getattr(args, "json", False):
        emit(args, {"error": str(error), "error_type": type(error).__name__}, "")
    else:
        print(f"ranapass {args.command}: error: {error}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    try:
        model, _, windows = load_inputs(args)
    except (ModelLoadError, TextSourceError, ValueError) as e:
        return fail(args, e)
    rep = report(args, model, windows)
    emit(args, rep, format_report(rep))
    return 0
