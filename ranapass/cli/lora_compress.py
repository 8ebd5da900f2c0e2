"""``ranapass lora-compress``: shrink a trained LoRA adapter to a fraction of its parameters or FLOPs."""

from __future__ import annotations

import argparse
from pathlib import Path

from ranapass.cli._shared import add_json_flag, emit
from ranapass.data import calibration_windows
from ranapass.lora import CALIBRATED_ERRORS, ERRORS, METHODS, TARGETS, calibrate_lora, compress_lora, load_lora
from ranapass.errors import RanapassError
from ranapass.models import load_model

DEFAULT_CALIBRATION_WINDOWS = 32


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "lora-compress",
        help="truncate a LoRA adapter's ranks, allocated across the whole network (PEFT adapter folder)",
        description="Compress a PEFT LoRA adapter post hoc: the SVD of every update dW = B A (from the factors), "
                    "ranks allocated across modules for the budget, a new adapter PEFT loads as it is.",
    )
    parser.add_argument("adapter", type=Path,
                        help="PEFT adapter folder (adapter_config.json, adapter_model.safetensors)")
    parser.add_argument("--keep", type=float, default=0.25,
                        help="fraction of the cost to keep, in (0, 1] (default 0.25)")
    parser.add_argument("--out", type=Path,
                        help="folder to write the compressed adapter to (omit to only print the table)")
    parser.add_argument("--method", choices=METHODS, default="global",
                        help="global: ranapass allocator (least error for the cost); threshold: PARA's one "
                             "global singular-value threshold; uniform: the same rank fraction everywhere")
    parser.add_argument("--target", choices=TARGETS, default="params", help="what --keep counts (default params)")
    parser.add_argument("--error", choices=ERRORS, default="energy",
                        help="energy: discarded ||dW||^2 (data-free, default); relative: each module's discarded "
                             "share; output: expected output error relative to the base layer's; fisher: "
                             "second-order loss change from the loss's output gradients (one backward pass per "
                             "calibration window); output and fisher are measured on calibration text with the "
                             "base model and the adapter (--model, --text)")
    calibration = parser.add_argument_group("calibration (--error output, --error fisher)")
    calibration.add_argument("--model", help="the adapter's base model: name, folder, .gguf or HF id "
                                             "(default: the adapter's base_model_name_or_path)")
    calibration.add_argument("--text", default="python-docs", help="text source; its calibration split is used")
    calibration.add_argument("--calib-windows", type=int, default=DEFAULT_CALIBRATION_WINDOWS,
                             help=f"calibration windows (default {DEFAULT_CALIBRATION_WINDOWS})")
    calibration.add_argument("--calib-window-len", type=int, default=512, help="tokens per calibration window")
    add_json_flag(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.out is not None and args.out.resolve() == args.adapter.resolve():
        raise RanapassError("--out must differ from the input adapter folder (it would overwrite it)")
    if not 0.0 < args.keep <= 1.0:
        raise RanapassError(f"--keep must be in (0, 1], got {args.keep}")
    for name in ("calib_windows", "calib_window_len"):
        if getattr(args, name) < 1:
            raise RanapassError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    adapter = load_lora(args.adapter)
    calibration = None
    if args.error in CALIBRATED_ERRORS:
        name = args.model or adapter.config.get("base_model_name_or_path")
        if not name:
            raise RanapassError(f"--error {args.error} needs the base model: the adapter names none, pass --model")
        model, tokenizer = load_model(name)
        windows = calibration_windows(tokenizer, args.text, num_windows=args.calib_windows,
                                      window=args.calib_window_len)
        calibration = calibrate_lora(adapter, model, windows,
                                     gradient_data=windows if args.error == "fisher" else None)
    result = compress_lora(adapter, args.keep, method=args.method, target=args.target, error=args.error,
                           calibration=calibration)
    payload = {"adapter": str(args.adapter), "out": None if args.out is None else str(args.out), **result.to_dict()}
    text = result.summary()
    if args.out is not None:
        result.adapter.save(args.out)
        text += f"\nwrote {args.out} (load with peft.PeftModel.from_pretrained(base_model, {str(args.out)!r}))"
    emit(args, payload, text)
    return 0
