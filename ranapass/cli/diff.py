"""``ranapass diff``: which linears of the model's graph the ranapass pass rewrites, and into what."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ranapass.cli._shared import (
    add_json_flag,
    add_model_args,
    add_plan_args,
    add_profile_args,
    check_args,
    emit,
    load_profile,
    model_from_args,
    plan_from_args,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "diff", help="graph diff of the ranapass rewrite: per-node table, unified diff, HTML",
        description="Trace the model with Dynamo on an example prompt, run the ranapass pass with a plan "
                    "attached (--plan, or --budget from the cached profile), and print the per-node table "
                    "and the unified diff of the graph code before and after the pass.")
    add_model_args(parser)
    parser.add_argument("--plan", default=None, help="a saved plan (directory) instead of --budget")
    parser.add_argument("--text", default="python-docs", help="text source whose calibration split profiles")
    add_profile_args(parser)
    add_plan_args(parser)
    parser.add_argument("--tokens", type=int, default=16,
                        help="length of the example prompt (random token ids: the graph does not depend on them)")
    parser.add_argument("--out", type=Path, help="write the full diff to this file")
    parser.add_argument("--format", choices=("text", "html"),
                        help="format of --out (default: html for a .html file, else text)")
    add_json_flag(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import ranapass
    from ranapass.diff import diff

    loaded = check_args(args)
    model, tokenizer = model_from_args(args)
    plan = loaded or plan_from_args(args, load_profile(args, model, tokenizer)[0])
    ranapass.attach(model, plan)
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    result = diff(model, ids.to(next(model.parameters()).device))

    payload = result.to_dict()
    text = "\n\n".join([result.summary(), result.table()])
    if args.out is not None:
        fmt = args.format or ("html" if args.out.suffix.lower() in (".html", ".htm") else "text")
        args.out.write_text(result.to_html() if fmt == "html" else str(result) + "\n")
        payload["out"] = str(args.out)
        text += f"\n\nwrote the full diff ({fmt}) to {args.out}"
    else:
        text += "\n\n" + result.unified()
    emit(args, payload, text)
    return 0
