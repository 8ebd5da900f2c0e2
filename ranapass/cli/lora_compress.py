"""``ranapass lora-compress``: shrink a trained LoRA adapter to a fraction of its parameters or FLOPs."""

from __future__ import annotations

import argparse
from pathlib import Path

from ranapass.cli._output import add_json_flag, emit
from ranapass.lora import ERRORS, METHODS, TARGETS, compress_lora, load_lora


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "lora-compress",
        help="truncate a LoRA adapter's ranks, allocated across the whole network (PEFT adapter folder)",
        description="Compress a PEFT LoRA adapter post hoc: the SVD of every update ΔW = B·A (from the factors), "
                    "ranks allocated across modules for the budget, a new adapter PEFT loads as it is.",
    )
    parser.add_argument("adapter", type=Path,
                        help="PEFT adapter folder (adapter_config.json, adapter_model.safetensors)")
    parser.add_argument("--keep", type=float, default=0.25,
                        help="fraction of the cost to keep, in (0, 1] (default 0.25)")
    parser.add_argument("--out", type=Path,
                        help="folder to write the compressed adapter to (omit to only print the table)")
    parser.add_argument("--method", choices=METHODS, default="global",
                        help="global: ranapass allocator (least discarded energy for the cost); threshold: PARA's "
                             "one global singular-value threshold; uniform: the same rank fraction everywhere")
    parser.add_argument("--target", choices=TARGETS, default="params", help="what --keep counts (default params)")
    parser.add_argument("--error", choices=ERRORS, default="energy",
                        help="what the global method minimises: discarded energy, or each module's discarded share")
    add_json_flag(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.out is not None and args.out.resolve() == args.adapter.resolve():
        raise SystemExit("--out must differ from the input adapter folder (it would overwrite the adapter)")
    try:
        result = compress_lora(load_lora(args.adapter), args.keep, method=args.method, target=args.target,
                               error=args.error)
    except (OSError, ValueError) as e:
        raise SystemExit(f"ranapass lora-compress: error: {e}") from e
    payload = {"adapter": str(args.adapter), "out": None if args.out is None else str(args.out), **result.to_dict()}
    text = result.summary()
    if args.out is not None:
        result.adapter.save(args.out)
        text += f"\nwrote {args.out} (load with peft.PeftModel.from_pretrained(base_model, {str(args.out)!r}))"
    emit(args, payload, text)
    return 0
