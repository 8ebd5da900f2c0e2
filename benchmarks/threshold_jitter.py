"""How much adapted perplexity moves when every threshold moves by a relative epsilon (eager, CPU).

Hard per-token thresholds make the adapted model a discontinuous function of its inputs: rounding that
flips one mask changes later activations and flips more. This measures the size of that effect, the
yardstick for comparing compiled against eager perplexity::

    python benchmarks/threshold_jitter.py                  # SmolLM2 at 0.56, 8 x 256 tokens, eps +-1e-6, 1e-5
"""

from __future__ import annotations

import argparse

import ranapass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.56)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--window-len", type=int, default=256)
    parser.add_argument("--eps", type=float, nargs="+", default=[1e-6, -1e-6, 1e-5])
    args = parser.parse_args(argv)

    model, tokenizer = ranapass.load_model()
    plan = ranapass.profile(model, ranapass.calibration_windows(tokenizer, num_windows=128)).plan(args.budget)
    windows = ranapass.evaluation_windows(tokenizer, num_windows=args.windows, window=args.window_len)
    base = ranapass.adapted_perplexity(model, plan, windows, progress=False).perplexity.ppl
    print(f"budget {args.budget}, {args.windows} x {args.window_len} tokens: eager adapted ppl {base:.4f}")
    for eps in args.eps:
        for unit in plan.adapted:
            unit.adapter.thresholds.mul_(1 + eps)
        ppl = ranapass.adapted_perplexity(model, plan, windows, progress=False).perplexity.ppl
        for unit in plan.adapted:
            unit.adapter.thresholds.div_(1 + eps)
        print(f"thresholds x (1 {eps:+g}): ppl {ppl:.4f} ({100 * (ppl / base - 1):+.2f}%)")


if __name__ == "__main__":
    main()
