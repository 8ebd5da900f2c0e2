"""``ranapass plan``: allocate ranks under a FLOP budget from the (cached) profile; print and save the plan."""

from __future__ import annotations

import argparse

from ranapass.cli._shared import (
    add_json_flag,
    add_model_calibration_args,
    add_plan_args,
    check_args,
    corrected_from_args,
    emit,
    load_profile,
    model_from_args,
    objective_options,
    plan_from_args,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("plan", aliases=["budget"], description=__doc__,
                                   help="allocate under a FLOP budget: per-layer table, expected FLOPs")
    add_model_calibration_args(parser)
    add_plan_args(parser)
    parser.add_argument("--curve", default=None, metavar="B1,B2,...",
                        help="also print the predicted error at these budgets")
    parser.add_argument("--plot", default=None, metavar="FILE.png", help="plot predicted error against budget")
    parser.add_argument("--recover", type=int, default=0, metavar="EPOCHS",
                        help="fit an output correction by distillation from the dense model over the calibration "
                             "windows for this many epochs (ranapass.recover; 3 is the measured default): it pays "
                             "under budget 0.6 and costs above, see docs/quality.md")
    parser.add_argument("--bias-step", action="store_true",
                        help="give the adapters an output bias from one Gauss-Newton step on the KL from the dense "
                             "model over the calibration windows (ranapass.bias_step; seconds on a GPU, minutes on "
                             "a CPU): it pays from budget 0.7 down, and plans nearer the dense model get none")
    parser.add_argument("--out", help="save the plan into this directory (plan.json + tensors.safetensors)")
    add_json_flag(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_args(args)
    model, tokenizer = model_from_args(args)
    prof, _ = load_profile(args, model, tokenizer)
    plan = corrected_from_args(args, model, tokenizer, prof, plan_from_args(args, prof))
    if args.out:
        plan.save(args.out)
    budgets = [float(b) for b in args.curve.split(",")] if args.curve else []
    if args.plot and not budgets:
        budgets = [round(0.3 + 0.05 * i, 2) for i in range(15)]
    curve = prof.curve(budgets, allocation=args.allocation, kinds=tuple(k for k in args.kinds.split(",") if k),
                       **objective_options(args)) if budgets else []
    if args.plot:
        _plot(curve, args.plot, args.allocation)
    payload = {"budget": plan.budget, "allocation": plan.allocation, "expected_ratio": plan.expected_ratio(),
               "dense_flops_per_token": plan.dense_flops(), "expected_flops_per_token": plan.expected_flops(),
               "units": [{"name": u.name, "kind": u.kind, "rank": getattr(u.adapter, "rank", None),
                          "expected_kept": u.expected_kept, "tau": getattr(u.adapter, "tau", None),
                          "dense_flops": u.dense_flops, "flops": u.flops(), "predicted_error": u.predicted_error}
                         for u in plan.units],
               "meta": plan.meta, "curve": curve, "saved_to": args.out}
    text = plan.summary() + _correction_line(plan)
    if curve:
        text += "\n\npredicted error by budget:\n" + "\n".join(
            f"  {c['budget']:.2f}: expected ratio {c['expected_ratio']:.4f}, predicted error {c['predicted_error']:.4g}"
            for c in curve)
    emit(args, payload, text)
    return 0


def _correction_line(plan) -> str:
    """What ``--recover`` or ``--bias-step`` did, in one line (empty without either)."""
    if "recovery" in plan.meta:
        rec = plan.meta["recovery"]
        history = rec["history"]
        return (f"\noutput recovery: held-out KL {history[0]['holdout_kl']:.4f} -> "
                f"{history[rec['kept_epoch']]['holdout_kl']:.4f} nats per token (epoch {rec['kept_epoch']} kept)")
    if "bias_step" in plan.meta:
        step = plan.meta["bias_step"]
        before = step["searched"][0][1]
        if not step["alpha"]:
            return f"\nbias step: none (held-out KL {before:.4f} nats per token)"
        after = min(kl for _, kl in step["searched"])
        return f"\nbias step: held-out KL {before:.4f} -> {after:.4f} nats per token (step length {step['alpha']:.3g})"
    return ""


def _plot(curve: list[dict], path: str, allocation: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([c["expected_ratio"] for c in curve], [c["predicted_error"] for c in curve], marker="o")
    ax.set_xlabel("expected FLOP ratio (block linears)")
    ax.set_ylabel("predicted error (weighted)")
    ax.set_yscale("log")
    ax.set_title(f"ranapass {allocation} allocation")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
