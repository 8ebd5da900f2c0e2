"""Ablation of the allocator's loss calibration against both TEAL-style baselines, budgets 0.4 to 0.9.

SmolLM2-135M-Instruct on CPU. One profile of 32 calibration windows without loss calibration, then its
curves calibrated to the loss (``ranapass.loss_calibration``) with the probes at 50% kept only (the
default) and at 50% and 85% kept (scales interpolated by each candidate's FLOP fraction): both come from
one set of probes, the 50% rows reading only its first level. Plans at each
budget with the default error exponent (2), with and without the first-order loss term
(``PlanOptions.first_order``); TEAL-style uniform input sparsity (``ranapass.baselines.teal``)
and TEAL's greedy per-block allocation (``ranapass.baselines_greedy.teal_greedy``) at the same budgets.
Each plan is scored on the protocol's 32 Python-docs windows and 16 Debian-handbook windows (512 tokens),
FLOP ratio measured from the real masks; every row is compared with the default by paired per-window
differences (``quality.paired``), and the default with dense::

    python benchmarks/allocator_ablation.py [--out DIR] [--cache DIR] [--methods ...] [--budgets ...]
        [--prepared DIR --model M.gguf --device cuda]

On a machine without the texts (the GPU machine), ``--prepared DIR`` reads the same token windows from
``calibration_spread.py prepare --out DIR`` (the protocol's calibration windows and both texts' evaluation
windows), and ``--model``/``--device`` say what to load where.

``--cache DIR`` keeps the uncalibrated profile there (``ranapass.profile(cache=DIR)``) and reuses it on a
rerun. Writes ``allocator_ablation.json`` (every window's loss, timings) and ``allocator_ablation.md`` (the
table), rewritten after every budget.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see quality.py

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from prepared_windows import protocol_windows  # noqa: E402
from quality import evaluate, paired, write_results  # noqa: E402

import ranapass  # noqa: E402
from ranapass import baselines, baselines_greedy  # noqa: E402
from ranapass.loss_calibration import LossScale, loss_scales, rescaled  # noqa: E402
from ranapass.profiling import Profile, ProfileOptions  # noqa: E402

BUDGETS = (0.8, 0.7, 0.9, 0.6, 0.56, 0.5, 0.4)
"""Measured in this order (the mild budgets first); the table lists them rising."""
DEFAULT = "ranapass (probes at 50%, default)"
TWO_LEVELS = "ranapass (probes at 50% and 85%)"
NO_FIRST_ORDER = "ranapass (no first-order term)"
UNCALIBRATED = "ranapass (no loss calibration)"
TEAL = "TEAL-style"
TEAL_GREEDY = "TEAL-style (greedy per block)"
METHODS = (DEFAULT, NO_FIRST_ORDER, TWO_LEVELS, UNCALIBRATED, TEAL, TEAL_GREEDY)
PROBE_LEVELS = (0.5, 0.85)
"""The probe levels of the two-level row; the default (``PROBE_KEPT``, 50%) reads only the first."""
GREEDY = {"greedy_windows": 2, "step": 0.02, "max_sparsity": 0.7}
"""TEAL-greedy's search, as benchmarks/quality.py runs it."""


def calibrated(plain: Profile, scales: dict[str, LossScale], meta: dict) -> Profile:
    """``plain``'s curves rescaled by ``scales`` (what ``ranapass.profile`` does with loss calibration on)."""
    return Profile(plain.model, rescaled(plain.sites, scales), holdout=plain.holdout, fingerprint=plain.fingerprint,
                   meta={**plain.meta, "loss_calibration": meta})


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--cache", type=Path, default=None, help="profile cache folder (default: no cache)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), metavar="METHOD",
                    help="rows to measure (default: all; the default is always measured): "
                    + "; ".join(METHODS).replace("%", "%%"))
    ap.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS))
    ap.add_argument("--prepared", type=Path, default=None,
                    help="token windows from `calibration_spread.py prepare` (default: made from the texts here)")
    ap.add_argument("--model", default="smollm2", help="model name or path (ranapass.load_model)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    methods = [DEFAULT] + [m for m in args.methods if m != DEFAULT]
    torch.set_num_threads(args.threads)
    model, tokenizer = ranapass.load_model(args.model, device=args.device)
    calibration, texts = protocol_windows(tokenizer, args.prepared)
    seconds = {}
    start = time.perf_counter()
    plain = ranapass.profile(model, calibration, cache=args.cache or False,
                             options=ProfileOptions(loss_calibration=False))
    seconds["profile without loss calibration (wall, this run)"] = time.perf_counter() - start
    seconds["profile without loss calibration (its own record)"] = plain.meta["profile_seconds"]
    start = time.perf_counter()
    scales, facts = loss_scales(model, plain.sites, plain.holdout, ProfileOptions().batch_size, PROBE_LEVELS)
    seconds[f"loss calibration, probes at {list(PROBE_LEVELS)}"] = time.perf_counter() - start
    first = {name: LossScale(s.at[:1], s.scale[:1]) for name, s in scales.items()}
    profiles = {DEFAULT: calibrated(plain, first, facts), TWO_LEVELS: calibrated(plain, scales, facts), UNCALIBRATED: plain}
    profiles[NO_FIRST_ORDER] = profiles[DEFAULT]
    overrides = {NO_FIRST_ORDER: {"first_order": False}}
    held = ProfileOptions().holdout_windows   # the baselines hold out the profile's held-out windows
    sparsity = {}
    if TEAL in methods:
        start = time.perf_counter()
        sparsity[TEAL] = baselines.teal(model, calibration, holdout_windows=held)
        seconds["calibrate TEAL-style"] = time.perf_counter() - start
    if TEAL_GREEDY in methods:
        start = time.perf_counter()
        sparsity[TEAL_GREEDY] = baselines_greedy.teal_greedy(model, calibration, holdout_windows=held, **GREEDY)
        seconds["calibrate TEAL-style (greedy per block)"] = time.perf_counter() - start
    res = {"dense": evaluate(model, None, texts), "seconds": seconds, "loss_calibration": facts,
           "greedy": GREEDY, "device": str(args.device), "torch": torch.__version__, "rows": {}}
    for budget in args.budgets:
        rows = {}
        for name in methods:
            start = time.perf_counter()
            plan = profiles[name].plan(budget, **overrides.get(name, {})) if name in profiles else \
                sparsity[name].plan(budget)
            rows[name] = {"plan_seconds": time.perf_counter() - start, **evaluate(model, plan, texts)}
        for name, row in rows.items():
            for text in texts:
                row[text]["vs_default"] = paired(row[text]["window_nll"], rows[DEFAULT][text]["window_nll"])
        for text in texts:
            rows[DEFAULT][text]["vs_dense"] = paired(rows[DEFAULT][text]["window_nll"], res["dense"][text]["window_nll"])
        res["rows"][str(budget)] = rows
        write_results(args.out, "allocator_ablation", res, report(res))
        print(f"budget {budget} done", flush=True)
    print(report(res))
    return res


def report(res: dict) -> str:
    """One table: perplexity (measured ratio) and the paired difference against the default, per budget,
    method and text (the default against dense); then the lowest method per budget and text."""
    dense = ", ".join(f"{t} {r['ppl']:.2f}" for t, r in res["dense"].items())
    lines = [f"Dense: {dense}.", "",
             "| budget | method | text | ppl (measured ratio) | vs default (vs dense for the default) |",
             "|---|---|---|---|---|"]
    budgets = sorted(res["rows"], key=float)
    for budget in budgets:
        for name, row in res["rows"][budget].items():
            for text in res["dense"]:
                r = row[text]
                p = r["vs_dense"] if "vs_dense" in r else r["vs_default"]
                cell = f"{100 * p['rel_ppl_diff']:+.2f} ± {100 * p['rel_se']:.2f}% ({p['verdict']})"
                lines.append(f"| {budget} | {name} | {text} | {r['ppl']:.2f} ({r['ratio']:.3f}) | {cell} |")
    lines += ["", "Lowest perplexity per budget and text (the verdicts are the other methods' against the default: "
              "'higher' = the default lower by at least one paired standard error, 'tie' = within 0.2%):", ""]
    for budget in budgets:
        rows = res["rows"][budget]
        for text in res["dense"]:
            best = min(rows, key=lambda n: rows[n][text]["ppl"])
            others = ", ".join(f"{n}: {rows[n][text]['vs_default']['verdict']}" for n in rows if n != DEFAULT)
            lines.append(f"- {budget}, {text}: lowest {best} ({others})")
    if res.get("seconds"):
        lines += ["", "Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in res["seconds"].items()) + "; plan(): " +
                  ", ".join(f"{b} {res['rows'][b][DEFAULT]['plan_seconds']:.1f}" for b in budgets) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
