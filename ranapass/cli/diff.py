"""``ranapass diff``: show which linears of a model's graph the ranapass pass rewrites, and into what."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ranapass.cli._output import add_json_flag, emit


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "diff", help="graph diff of the ranapass rewrite (table, unified diff, HTML)",
        description="Trace the model with Dynamo, run the ranapass pass with the plan attached, and print the "
                    "per-node table and the unified diff of the graph code before and after.")
    parser.add_argument("--model", help="Hugging Face model id or local path (default: the bundled SmolLM2)")
    parser.add_argument("--plan", required=True, type=Path, help="plan directory written by Plan.save")
    parser.add_argument("--tokens", type=int, default=16, help="length of the example prompt (default 16)")
    parser.add_argument("--out", type=Path, help="write the full diff to this file")
    parser.add_argument("--format", choices=("text", "html"),
                        help="format of --out (default: html for a .html file, else text)")
    add_json_flag(parser)
    parser.set_defaults(func=run)


def _load_model(name: str | None) -> torch.nn.Module:
    if name is None:
        from ranapass.models import load_model

        return load_model()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(name).eval()


def run(args: argparse.Namespace) -> int:
    import ranapass
    from ranapass.diff import diff

    model = _load_model(args.model)
    ranapass.attach(model, ranapass.Plan.load(args.plan))
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
