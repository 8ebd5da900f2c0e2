"""What the commands share: ``--json`` output, the error report, calibration and plan arguments, the profile.

Commands raise ``RanapassError`` for what the user can fix; ``main`` reports it through ``report_error``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any

import torch

from ranapass.data import calibration_windows
from ranapass.models import DEFAULT_MODEL
from ranapass.errors import RanapassError
from ranapass.plan import Plan
from ranapass.planning import PlanOptions, check_budget
from ranapass.profiling import Profile, ProfileOptions, profile

DEFAULT_CALIBRATION_WINDOWS = 128


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def emit(args: argparse.Namespace, payload: dict[str, Any], text: str) -> None:
    """Print ``payload`` as one JSON object when ``--json`` was given, else ``text``."""
    if getattr(args, "json", False):
        print(json.dumps(payload, indent=None, default=float))
    else:
        print(text)


def report_error(args: argparse.Namespace, error: Exception) -> int:
    """Report a user-fixable error: ``{"error": ...}`` on stdout with ``--json``, else one line
    ``ranapass COMMAND: error: ...`` on stderr; returns the exit status 2. ``-v`` also logs the traceback."""
    logging.getLogger(__name__).debug("%s failed", args.command, exc_info=error)
    if getattr(args, "json", False):
        emit(args, {"error": str(error), "error_type": type(error).__name__}, "")
    else:
        print(f"ranapass {args.command}: error: {' '.join(str(error).split())}", file=sys.stderr)
    return 2


def add_model_calibration_args(parser: argparse.ArgumentParser) -> None:
    """``--model`` and ``--text`` (whose calibration split is used), then the profile arguments."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model name, folder, .gguf or HF id")
    parser.add_argument("--text", default="python-docs", help="text source; its calibration split is used")
    add_profile_args(parser)


def add_profile_args(parser: argparse.ArgumentParser) -> None:
    """``--calib-windows``, ``--calib-window-len``, ``--error-weighting``, ``--no-cache``, ``--data-free``."""
    parser.add_argument("--calib-windows", type=int, default=DEFAULT_CALIBRATION_WINDOWS,
                        help=f"calibration windows of 512 tokens from the calibration split of --text "
                             f"(default {DEFAULT_CALIBRATION_WINDOWS}; 2 are held out to fit thresholds)")
    parser.add_argument("--calib-window-len", type=int, default=512, help="tokens per calibration window")
    parser.add_argument("--error-weighting", choices=("fisher", "relative"), default="fisher",
                        help="how errors are made comparable across layers (default: output-gradient weighted)")
    parser.add_argument("--no-cache", action="store_true",
                        help="recalibrate even if a cached profile exists (and replace it, when the cache is usable)")
    parser.add_argument("--data-free", action="store_true",
                        help="no calibration text: static low rank from the weights' spectra, globally allocated")


def add_plan_args(parser: argparse.ArgumentParser, budget_required: bool = False) -> None:
    """``--budget``, ``--allocation``, ``--kinds``."""
    parser.add_argument("--budget", type=float, required=budget_required, default=None if budget_required else 0.56,
                        help="adapted / dense FLOPs of the block linears, in (0, 1]")
    parser.add_argument("--allocation", choices=("global", "uniform"), default="global",
                        help="global (one allocation over all layers) or uniform (the reference's recipe)")
    parser.add_argument("--kinds", default="rank,neuron",
                        help="candidate families for global allocation: rank, lowrank, neuron (comma-separated)")


def load_profile(args: argparse.Namespace, model: torch.nn.Module, tokenizer) -> tuple[Profile, float]:
    """Profile ``model`` on the calibration split of ``args.text`` (cached); returns it and the seconds taken."""
    start = time.perf_counter()
    if args.data_free:
        return profile(model, None, refresh=args.no_cache), time.perf_counter() - start
    windows = calibration_windows(tokenizer, args.text, num_windows=args.calib_windows, window=args.calib_window_len)
    prof = profile(model, windows, options=ProfileOptions(error_weighting=args.error_weighting),
                   refresh=args.no_cache)
    return prof, time.perf_counter() - start


def plan_from_args(args: argparse.Namespace, prof: Profile):
    return prof.plan(args.budget, allocation=args.allocation, kinds=tuple(k for k in args.kinds.split(",") if k))


_POSITIVE = {"windows": 1, "window_len": 2, "calib_windows": 1, "calib_window_len": 2, "batch_size": 1, "tokens": 1}
"""Integer arguments and their least value."""


def check_args(args: argparse.Namespace) -> Plan | None:
    """Validate the arguments a command has before any expensive work (model loading, calibration,
    a dense pass): sizes, ``--budget``, ``--kinds``; returns the ``--plan``, loaded and checked, or None."""
    for name, least in _POSITIVE.items():
        value = getattr(args, name, None)
        if value is not None and value < least:
            raise RanapassError(f"--{name.replace('_', '-')} must be at least {least}, got {value}")
    if getattr(args, "budget", None) is not None:
        try:
            check_budget(args.budget)
        except RanapassError as e:
            raise RanapassError(f"--budget {e}") from e
    if getattr(args, "kinds", None) is not None:
        PlanOptions(kinds=tuple(k for k in args.kinds.split(",") if k))
    return Plan.load(args.plan) if getattr(args, "plan", None) else None
