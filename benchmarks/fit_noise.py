"""How much a plan's perplexity moves with the threshold fit's random score subsample (SmolLM2, eager, CPU).

``fit_thresholds`` takes each unit's quantile on a random subsample of its held-out scores. Hard per-token
thresholds make the adapted model a discontinuous function of them (``threshold_jitter.py``), so two
subsamples, equally good, give plans whose perplexities differ by more than rounding. This refits one
allocation with several seeds and scores each fit the way ``allocator_ablation.py`` scores its rows (the
same 32-window profile, loss-calibrated with the default probes; 32 Python-docs and 16 Debian-handbook
windows of 512 tokens), each seed paired per window against the first::

    python benchmarks/fit_noise.py [--cache DIR] [--budget 0.56] [--seeds 0 1 2] [--out DIR]

Writes ``fit_noise.json`` (every window's loss) into ``--out``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see quality.py

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from allocator_ablation import calibrated  # noqa: E402
from quality import evaluate, paired  # noqa: E402

import ranapass  # noqa: E402
from ranapass.loss_calibration import loss_scales  # noqa: E402
from ranapass.profiling import ProfileOptions  # noqa: E402
from ranapass.thresholds import fit_thresholds  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=None, help="profile cache folder (as allocator_ablation.py's)")
    ap.add_argument("--budget", type=float, default=0.56)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = ranapass.load_model("smollm2")
    calibration = ranapass.calibration_windows(tokenizer, num_windows=32, window=512)
    plain = ranapass.profile(model, calibration, cache=args.cache or False,
                             options=ProfileOptions(loss_calibration=False))
    scales, facts = loss_scales(model, plain.sites, plain.holdout, ProfileOptions().batch_size)
    profile = calibrated(plain, scales, facts)
    texts = {"python-docs": ranapass.evaluation_windows(tokenizer, "python-docs", num_windows=32, window=512),
             "debian-handbook": ranapass.evaluation_windows(tokenizer, "debian-handbook", num_windows=16, window=512)}
    res = {"budget": args.budget, "fits": {}}
    for seed in args.seeds:
        plan = profile.plan(args.budget, fit=False)
        fit_thresholds(model, plan, profile.holdout, seed=seed)
        res["fits"][str(seed)] = row = evaluate(model, plan, texts)
        first = res["fits"][str(args.seeds[0])]
        cells = []
        for text in texts:
            p = paired(row[text]["window_nll"], first[text]["window_nll"])
            row[text]["vs_first_seed"] = p
            cells.append(f"{text} {row[text]['ppl']:.3f} (ratio {row[text]['ratio']:.4f}, "
                         f"{100 * p['rel_ppl_diff']:+.2f} ± {100 * p['rel_se']:.2f}%)")
        print(f"budget {args.budget}, seed {seed}: " + "; ".join(cells), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / ".fit_noise.json.tmp"
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(args.out / "fit_noise.json")
    return res


if __name__ == "__main__":
    main()
