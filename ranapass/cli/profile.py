"""``ranapass profile``: calibrate a model once (cached) and show what budgets would cost in error."""

from __future__ import annotations

import argparse

from ranapass.cli._shared import add_json_flag, add_model_calibration_args, check_args, emit, load_profile
from ranapass.models import load_model

BUDGETS = (0.4, 0.5, 0.56, 0.6, 0.7, 0.8, 0.9)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("profile", help="calibrate a model (cached) and print predicted error by budget",
                                   description=__doc__)
    add_model_calibration_args(parser)
    parser.add_argument("--out", help="also save the profile into this directory")
    add_json_flag(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_args(args)
    model, tokenizer = load_model(args.model)
    prof, seconds = load_profile(args, model, tokenizer)
    if args.out:
        prof.save(args.out)
    curve = prof.curve(BUDGETS)
    payload = {"model": args.model, "sites": len(prof.sites), "units": len(prof.units), "seconds": round(seconds, 1),
               "meta": prof.meta, "curve": curve, "saved_to": args.out}
    lines = [f"profiled {args.model}: {len(prof.units)} candidate units over {len(prof.sites)} input sites "
             f"({prof.meta.get('data')}, error weighting {prof.meta.get('error_weighting')}; "
             f"calibration took {prof.meta.get('profile_seconds')} s, this call {seconds:.1f} s)",
             f"{'budget':>7} {'expected ratio':>15} {'predicted error':>16}"]
    lines += [f"{c['budget']:>7.2f} {c['expected_ratio']:>15.4f} {c['predicted_error']:>16.4g}" for c in curve]
    emit(args, payload, "\n".join(lines))
    return 0
