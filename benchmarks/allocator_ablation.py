"""Ablation of the allocator's objective: loss calibration (profile) and error exponent (plan) against TEAL-style.

SmolLM2-135M-Instruct on CPU. One profile of 32 calibration windows with ``ProfileOptions.loss_calibration``
on and one with it off; plans at each budget with ``error_exponent`` 1 (the plain additive proxy) and
the default 2; TEAL-style uniform input sparsity (``ranapass.baselines.teal``) at the same budgets. Each
plan is scored on the protocol's 32 Python-docs windows and 16 Debian-handbook windows (512 tokens), FLOP
ratio measured from the real masks; every row is compared with the additive, uncalibrated allocation and
with TEAL-style by paired per-window differences (``quality.paired``)::

    python benchmarks/allocator_ablation.py [--out DIR]    # about 40 minutes on 2 cores

Writes ``allocator_ablation.json`` (every window's loss) and ``allocator_ablation.md`` (the table).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see quality.py

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import evaluate, paired  # noqa: E402

import ranapass  # noqa: E402
from ranapass import baselines  # noqa: E402
from ranapass.profiling import ProfileOptions  # noqa: E402

BUDGETS = (0.4, 0.56, 0.7, 0.8)
BASE = "additive, uncalibrated"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = ranapass.load_model("smollm2")
    calibration = ranapass.calibration_windows(tokenizer, num_windows=32, window=512)
    start = time.perf_counter()
    calibrated = ranapass.profile(model, calibration, cache=False)
    seconds = {"profile, calibrated": time.perf_counter() - start}
    start = time.perf_counter()
    plain = ranapass.profile(model, calibration, cache=False, options=ProfileOptions(loss_calibration=False))
    seconds["profile, uncalibrated"] = time.perf_counter() - start
    teal = baselines.teal(model, torch.cat([calibration[:16], calibration[-2:]]), holdout_windows=2)
    texts = {"python-docs": ranapass.evaluation_windows(tokenizer, "python-docs", num_windows=32, window=512),
             "debian-handbook": ranapass.evaluation_windows(tokenizer, "debian-handbook", num_windows=16, window=512)}
    methods = {BASE: lambda b: plain.plan(b, error_exponent=1.0),
               "loss calibration": lambda b: calibrated.plan(b, error_exponent=1.0),
               "error exponent 2": lambda b: plain.plan(b),
               "both (default)": lambda b: calibrated.plan(b),
               "TEAL-style": lambda b: teal.plan(b)}
    res = {"dense": evaluate(model, None, texts), "seconds": seconds,
           "loss_calibration": calibrated.meta["loss_calibration"], "rows": {}}
    for budget in BUDGETS:
        rows = res["rows"][str(budget)] = {}
        for name, make in methods.items():
            start = time.perf_counter()
            plan = make(budget)
            rows[name] = {"plan_seconds": time.perf_counter() - start, **evaluate(model, plan, texts)}
        for name, row in rows.items():
            for text in texts:
                row[text]["vs_base"] = paired(row[text]["window_nll"], rows[BASE][text]["window_nll"])
                row[text]["vs_teal"] = paired(row[text]["window_nll"], rows["TEAL-style"][text]["window_nll"])
        print(f"budget {budget} done", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "allocator_ablation.json").write_text(json.dumps(res, indent=1))
    (args.out / "allocator_ablation.md").write_text(report(res))
    print(report(res))
    return res


def report(res: dict) -> str:
    """One table: perplexity (measured ratio) and the paired differences, per budget, method and text."""
    dense = ", ".join(f"{t} {r['ppl']:.2f}" for t, r in res["dense"].items())
    lines = [f"Dense: {dense}.", "",
             f"| budget | method | text | ppl (measured ratio) | vs {BASE} | vs TEAL-style |", "|---|---|---|---|---|---|"]
    for budget, rows in res["rows"].items():
        for name, row in rows.items():
            for text in res["dense"]:
                r = row[text]
                cells = [f"{100 * r[k]['rel_ppl_diff']:+.2f} ± {100 * r[k]['rel_se']:.2f}%" for k in ("vs_base", "vs_teal")]
                lines.append(f"| {budget} | {name} | {text} | {r['ppl']:.2f} ({r['ratio']:.3f}) | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
