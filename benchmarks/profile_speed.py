"""Where ``ranapass.profile`` spends its time with the default options, how long ``plan`` takes, and what
block replay saves in the loss calibration.

SmolLM2 on the CPU by default (32 calibration windows of 512 tokens, as ``ranapass profile``); with
``--model llama2-7b`` (or llama3-8b, tiny) random weights of those shapes, on the GPU when there is one, with the
token windows of a bench_pipeline.py ``--inputs`` folder (written where SmolLM2's tokenizer is)::

    python benchmarks/profile_speed.py [--compare-replay] [--out DIR]
    python benchmarks/bench_pipeline.py --inputs DIR --prepare-only    # then, on the GPU machine:
    python benchmarks/profile_speed.py --model llama2-7b --layers 8 --inputs DIR --compare-replay

Prints and writes (``profile_speed.json``) the profile's stages (``meta.timings``) and ``plan`` at two
budgets, first call and again. ``--compare-replay`` then runs the loss calibration on the profile's
held-out windows twice, replaying the blocks before each probe's first adapted linear and with whole
forwards, and fails unless both give the same scales.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see quality.py

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decode import build_model  # noqa: E402
from bench_pipeline import MODELS  # noqa: E402

import ranapass  # noqa: E402
from ranapass.cli._shared import DEFAULT_CALIBRATION_WINDOWS  # noqa: E402
from ranapass.loss_calibration import loss_scales  # noqa: E402
from ranapass.profiling import ProfileOptions  # noqa: E402

BUDGETS = (0.56, 0.7)


def load(args) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model and its calibration windows."""
    if args.model == "smollm2":
        model, tokenizer = ranapass.load_model("smollm2")
        return model, ranapass.calibration_windows(tokenizer, num_windows=args.windows, window=512)
    from transformers import AutoTokenizer

    if not args.inputs:
        raise SystemExit(f"--model {args.model} needs --inputs DIR (bench_pipeline.py --inputs DIR --prepare-only)")
    windows = torch.load(Path(args.inputs) / "windows.pt")["calibration"][: args.windows]
    shape = dataclasses.replace(MODELS[args.model], vocab=len(AutoTokenizer.from_pretrained(args.inputs)))
    cuda = torch.cuda.is_available()
    model = build_model(shape, args.layers or shape.layers, torch.bfloat16 if cuda else torch.float32,
                        "cuda" if cuda else "cpu")
    return model, windows


def environment() -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": " ".join(["python", *sys.argv])}
    import transformers

    info["transformers"] = transformers.__version__
    return info


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("smollm2", *sorted(MODELS)), default="smollm2",
                    help="smollm2, or random weights of bench_pipeline.py's shapes")
    ap.add_argument("--layers", type=int, default=0, help="decoder layers of a random-weight model (0: its own)")
    ap.add_argument("--windows", type=int, default=DEFAULT_CALIBRATION_WINDOWS,
                    help="calibration windows (512 tokens for smollm2; default: ranapass profile's)")
    ap.add_argument("--inputs", help="bench_pipeline.py's --inputs folder (random-weight models)")
    ap.add_argument("--compare-replay", action="store_true",
                    help="also time the loss calibration with and without block replay")
    ap.add_argument("--out", type=Path, default=Path("profile_speed_out"))
    args = ap.parse_args(argv)
    model, windows = load(args)
    start = time.perf_counter()
    prof = ranapass.profile(model, windows, cache=False)
    res = {"env": environment(), "model": args.model, "windows": list(windows.shape),
           "profile_wall_seconds": round(time.perf_counter() - start, 1),
           "profile_seconds": prof.meta["profile_seconds"], "timings": prof.meta["timings"],
           "loss_calibration": prof.meta["loss_calibration"], "plan_seconds": {}}
    print(f"profile: {res['profile_seconds']} s; stages: {json.dumps(res['timings'])}", flush=True)
    for budget in BUDGETS:
        times = []
        for _ in range(2):
            start = time.perf_counter()
            prof.plan(budget)
            times.append(round(time.perf_counter() - start, 2))
        res["plan_seconds"][str(budget)] = times
        print(f"plan({budget}): {times[0]} s, again {times[1]} s", flush=True)
    if args.compare_replay:
        scales = {}
        for replay in (True, False):
            start = time.perf_counter()
            scales[replay], facts = loss_scales(model, prof.sites, prof.holdout, ProfileOptions().batch_size,
                                                replay=replay)
            res[f"loss_calibration_seconds_{'replay' if replay else 'whole'}"] = round(time.perf_counter() - start, 1)
            res[f"replayed_blocks_{'replay' if replay else 'whole'}"] = facts["replayed_blocks"]
        same = all(np.array_equal(scales[True][n].scale, scales[False][n].scale) for n in scales[True])
        res["replay_gives_the_same_scales"] = same
        print(f"loss calibration: {res['loss_calibration_seconds_replay']} s with replay "
              f"({res['replayed_blocks_replay']} blocks replayed), {res['loss_calibration_seconds_whole']} s whole; "
              f"same scales: {same}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile_speed.json").write_text(json.dumps(res, indent=1))
    if args.compare_replay and not res["replay_gives_the_same_scales"]:
        raise SystemExit("block replay changed the loss scales")
    return res


if __name__ == "__main__":
    main()
