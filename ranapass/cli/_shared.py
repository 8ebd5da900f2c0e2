"""What the commands share: ``--json`` output, the error report, the model and where it runs, calibration
and plan arguments, the profile.

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

from ranapass.bias_step import bias_step
from ranapass.data import calibration_windows, split_holdout
from ranapass.errors import RanapassError
from ranapass.models import DEFAULT_MODEL, load_model
from ranapass.plan import Plan
from ranapass.planning import PlanOptions, check_budget
from ranapass.profiling import Profile, ProfileOptions, profile
from ranapass.recovery import recover

DEFAULT_CALIBRATION_WINDOWS = 32

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
"""Names ``--dtype`` accepts."""


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


def add_model_args(parser: argparse.ArgumentParser, model_help: str = "model name, folder, .gguf or HF id") -> None:
    """``--model``, and ``--device`` and ``--dtype``: where the model runs and in which precision."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    parser.add_argument("--device", default=None,
                        help="where the model runs: cpu, cuda, cuda:N (default: CUDA when available, else cpu)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="the weights' dtype (default: bfloat16 on a GPU, float32 on the CPU)")


def device_and_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """The device and dtype ``--device`` and ``--dtype`` name, or their defaults."""
    if args.device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(args.device)
        except RuntimeError as e:
            raise RanapassError(f"--device {args.device!r} is not a device: use cpu, cuda or cuda:N") from e
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RanapassError(f"--device {args.device}: no CUDA device is available here; use --device cpu")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise RanapassError(f"--device {args.device}: there are only {torch.cuda.device_count()} CUDA devices")
    if args.dtype is not None:
        return device, DTYPES[args.dtype]
    return device, torch.float32 if device.type == "cpu" else torch.bfloat16


def model_from_args(args: argparse.Namespace):
    """``(model, tokenizer)`` of ``--model``, on ``--device`` in ``--dtype`` (or spread by ``--device-map``)."""
    device, dtype = device_and_dtype(args)
    device_map = getattr(args, "device_map", None)
    if device_map is not None:
        return load_model(args.model, dtype=dtype, device_map=device_map, max_memory=getattr(args, "max_memory", None))
    return load_model(args.model, device=device, dtype=dtype)


def add_model_calibration_args(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--device``, ``--dtype``, ``--text`` (whose calibration split is used), then the profile
    arguments."""
    add_model_args(parser)
    parser.add_argument("--text", default="python-docs", help="text source; its calibration split is used")
    add_profile_args(parser)


def add_profile_args(parser: argparse.ArgumentParser) -> None:
    """``--calib-windows``, ``--calib-window-len``, ``--error-weighting``, ``--no-loss-calibration``,
    ``--no-cache``, ``--data-free``."""
    parser.add_argument("--calib-windows", type=int, default=DEFAULT_CALIBRATION_WINDOWS,
                        help=f"calibration windows of 512 tokens from the calibration split of --text "
                             f"(default {DEFAULT_CALIBRATION_WINDOWS}; 2 are held out to fit thresholds)")
    parser.add_argument("--calib-window-len", type=int, default=512, help="tokens per calibration window")
    parser.add_argument("--error-weighting", choices=("fisher", "relative"), default="fisher",
                        help="how errors are made comparable across layers (default: output-gradient weighted)")
    parser.add_argument("--no-loss-calibration", action="store_true",
                        help="keep the proxy errors as they are (default: rescale them to the loss measured by "
                             "probes on the held-out windows)")
    parser.add_argument("--no-cache", action="store_true",
                        help="recalibrate even if a cached profile exists (and replace it, when the cache is usable)")
    parser.add_argument("--data-free", action="store_true",
                        help="no calibration text: static low rank from the weights' spectra, globally allocated")


def add_plan_args(parser: argparse.ArgumentParser, budget_required: bool = False) -> None:
    """``--budget``, ``--allocation``, ``--kinds``, ``--error-exponent``, ``--no-first-order``."""
    parser.add_argument("--budget", type=float, required=budget_required, default=None if budget_required else 0.56,
                        help="adapted / dense FLOPs of the block linears, in (0, 1]")
    parser.add_argument("--allocation", choices=("global", "uniform"), default="global",
                        help="global (one allocation over all layers) or uniform (the reference's recipe)")
    parser.add_argument("--kinds", default="rank,neuron",
                        help="candidate families for global allocation: rank, lowrank, neuron (comma-separated)")
    add_objective_args(parser)


def add_objective_args(parser: argparse.ArgumentParser) -> None:
    """``--error-exponent`` and ``--no-first-order`` (``PlanOptions.error_exponent``, ``PlanOptions.first_order``)."""
    parser.add_argument("--error-exponent", type=float, default=PlanOptions.error_exponent,
                        help="global allocation minimises the sum of unit errors to this power "
                             f"(default {PlanOptions.error_exponent:g}; 1: the additive proxy)")
    parser.add_argument("--no-first-order", action="store_true",
                        help="leave the measured first-order loss change of input sparsity out of the allocation "
                             "(default: counted, on loss-calibrated profiles)")


def objective_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``PlanOptions`` fields that ``add_objective_args`` set."""
    return {"error_exponent": args.error_exponent, "first_order": not args.no_first_order}


def load_profile(args: argparse.Namespace, model: torch.nn.Module, tokenizer) -> tuple[Profile, float]:
    """Profile ``model`` on the calibration split of ``args.text`` (cached); returns it and the seconds taken."""
    start = time.perf_counter()
    if args.data_free:
        return profile(model, None, refresh=args.no_cache), time.perf_counter() - start
    windows = calibration_windows(tokenizer, args.text, num_windows=args.calib_windows, window=args.calib_window_len)
    options = ProfileOptions(error_weighting=args.error_weighting, loss_calibration=not args.no_loss_calibration)
    prof = profile(model, windows, options=options, refresh=args.no_cache)
    return prof, time.perf_counter() - start


def plan_from_args(args: argparse.Namespace, prof: Profile):
    return prof.plan(args.budget, allocation=args.allocation, kinds=tuple(k for k in args.kinds.split(",") if k),
                     **objective_options(args))


def corrected_from_args(args: argparse.Namespace, model: torch.nn.Module, tokenizer, prof: Profile, plan: Plan) -> Plan:
    """``plan``, or its output-corrected copy: with ``--recover EPOCHS`` recovered (``ranapass.recover``), with
    ``--bias-step`` given the bias step (``ranapass.bias_step``); either on the profile's calibration windows less
    the held-out ones, which choose the correction and refit the thresholds."""
    if not (args.recover or args.bias_step):
        return plan
    flag = "--bias-step" if args.bias_step else "--recover"
    if args.recover and args.bias_step:
        raise RanapassError("--recover and --bias-step both correct the adapters' outputs: give one of them")
    if args.data_free or prof.holdout is None:
        raise RanapassError(f"{flag} needs calibration text (a profile with held-out windows), not --data-free")
    windows = calibration_windows(tokenizer, args.text, num_windows=args.calib_windows, window=args.calib_window_len)
    train, holdout = split_holdout(windows, prof.holdout.shape[0])
    if train is None or holdout is None or not torch.equal(holdout.to(prof.holdout.device), prof.holdout):
        raise RanapassError(f"{flag}: the profile's held-out windows are not those of this calibration text; "
                            "profile again with --no-cache")
    if args.bias_step:
        return bias_step(model, plan, train, holdout)
    return recover(model, plan, train, holdout, epochs=args.recover)


_POSITIVE = {"windows": 1, "window_len": 2, "calib_windows": 1, "calib_window_len": 2, "batch_size": 1, "tokens": 1,
             "recover": 0}
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
        PlanOptions(kinds=tuple(k for k in args.kinds.split(",") if k),
                    error_exponent=getattr(args, "error_exponent", PlanOptions.error_exponent))
    return Plan.load(args.plan) if getattr(args, "plan", None) else None
