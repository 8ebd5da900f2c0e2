"""``ranapass profile``: calibrate a model once (cached) and show what budgets would cost in error.

Launched by ``torchrun`` (``WORLD_SIZE`` > 1), the processes calibrate shards of the windows together
(``ranapass.distributed``); rank 0 alone writes the profile and prints the report.
"""

from __future__ import annotations

import argparse
from typing import Any

from ranapass import distributed
from ranapass.cli._shared import (add_json_flag, add_model_calibration_args, check_args, emit, load_profile,
                                  model_from_args)
from ranapass.errors import RanapassError

BUDGETS = (0.4, 0.5, 0.56, 0.6, 0.7, 0.8, 0.9)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("profile", help="calibrate a model (cached) and print predicted error by budget",
                                   description=__doc__)
    add_model_calibration_args(parser)
    parser.add_argument("--out", help="also save the profile into this directory")
    parser.add_argument("--device-map", default=None, metavar="auto",
                        help="spread the model over the visible devices, then CPU, then disk (accelerate)")
    parser.add_argument("--max-memory", default=None, type=parse_max_memory, metavar="0=70GiB,cpu=200GiB",
                        help="with --device-map: the memory each device may hold")
    add_json_flag(parser)
    parser.set_defaults(func=run)


def parse_max_memory(text: str) -> dict[int | str, str]:
    """``"0=70GiB,1=70GiB,cpu=200GiB"`` -> ``{0: "70GiB", 1: "70GiB", "cpu": "200GiB"}``."""
    out: dict[int | str, str] = {}
    for part in filter(None, text.split(",")):
        device, sep, amount = part.partition("=")
        if not sep or not device.strip() or not amount.strip():
            raise argparse.ArgumentTypeError(f"expected DEVICE=AMOUNT pairs such as 0=70GiB,cpu=200GiB, got {part!r}")
        device = device.strip()
        out[int(device) if device.isdigit() else device] = amount.strip()
    return out


def run(args: argparse.Namespace) -> int:
    check_args(args)
    if args.max_memory is not None and args.device_map is None:
        raise RanapassError("--max-memory needs --device-map auto")
    distributed.init_from_env()
    try:
        return _profile(args)
    finally:
        distributed.shutdown()


def _profile(args: argparse.Namespace) -> int:
    model, tokenizer = model_from_args(args)
    prof, seconds = load_profile(args, model, tokenizer)
    if not distributed.is_main():
        return 0
    if args.out:
        prof.save(args.out)
    curve = prof.curve(BUDGETS)
    weight = next(model.parameters())
    payload = {"model": args.model, "device": str(weight.device), "dtype": str(weight.dtype).removeprefix("torch."),
               "sites": len(prof.sites), "units": len(prof.units), "seconds": round(seconds, 1),
               "meta": prof.meta, "curve": curve, "saved_to": args.out}
    lines = [f"profiled {args.model} on {payload['device']} in {payload['dtype']}: {len(prof.units)} candidate "
             f"units over {len(prof.sites)} input sites ({prof.meta.get('data')}, error weighting "
             f"{prof.meta.get('error_weighting')}; calibration took {prof.meta.get('profile_seconds')} s, "
             f"this call {seconds:.1f} s)",
             *_costs(prof.meta),
             f"{'budget':>7} {'expected ratio':>15} {'predicted error':>16}"]
    lines += [f"{c['budget']:>7.2f} {c['expected_ratio']:>15.4f} {c['predicted_error']:>16.4g}" for c in curve]
    emit(args, payload, "\n".join(lines))
    return 0


def _costs(meta: dict[str, Any]) -> list[str]:
    """Where the calibration's time went, and its peak GPU memory: each line only when the profile recorded it
    (a profile made on the CPU has no GPU peak)."""
    lines = []
    if meta.get("timings"):
        lines.append("seconds by stage: " + ", ".join(f"{k} {v:.2f}" for k, v in meta["timings"].items()))
    if meta.get("peak_gpu_memory_bytes") is not None:
        lines.append(f"peak GPU memory: {meta['peak_gpu_memory_bytes'] / 2**30:.2f} GiB")
    return lines
