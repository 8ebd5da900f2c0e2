"""``ranapass profile``: calibrate a model once (cached) and show what budgets would cost in error."""

from __future__ import annotations

import argparse

from typing import Any

from ranapass.cli._shared import add_json_flag, add_model_calibration_args, emit, load_profile, model_from_args

BUDGETS = (0.4, 0.5, 0.56, 0.6, 0.7, 0.8, 0.9)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("profile", help="calibrate a model (cached) and print predicted error by budget",
                                   description=__doc__)
    add_model_calibration_args(parser)
    parser.add_argument("--out", help="also save the profile into this directory")
    add_json_flag(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model, tokenizer = model_from_args(args)
    prof, seconds = load_profile(args, model, tokenizer)
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
