"""LoRA rank compression on a real adapter: evaluation loss before and after, by allocation method.

Trains (once, cached) a rank-16 LoRA on q, k, v, o, gate, up and down of SmolLM2-135M-Instruct over the
calibration split of the Python docs prose, then compresses it to ``--keep`` of its LoRA parameters with
each method (ranapass's global allocation, PARA's global singular-value threshold, uniform truncation;
data-free, or with ``-output`` calibrated on 32 windows of the calibration split), writes each result as
a PEFT adapter, loads it back with ``PeftModel.from_pretrained`` and measures the mean next-token loss
on held-out evaluation windows (the project's evaluation protocol by default).

    python benchmarks/lora_compress.py --threads 1 --keep 0.25 0.125 0.0625 --json results.json
    python benchmarks/lora_compress.py --adapter DIR        # an adapter of your own

Keeps that are whole ranks of the rank-16 adapter (0.25, 0.125, 0.0625: 4, 2, 1) compare uniform
truncation at exactly the same size. CPU only. Training is 300 steps of 2 x 128 tokens (1-3 s a step
on a quiet 2-core CPU, several times that on a shared one: pass --threads 1 there, as two OpenMP
threads on one free core crawl); each evaluation is 32 x 512 tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ranapass.cache import cache_dir
from ranapass.data import calibration_windows, evaluation_windows, load_texts, token_windows
from ranapass.evaluate import perplexity, protocol
from ranapass.lora import METHODS, calibrate_lora, compress_lora, load_lora
from ranapass.models import load_model

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# METHOD[-ERROR]: "global" is the data-free global allocation (discarded energy); "-output" is calibrated.
VARIANTS = [*METHODS, "global-relative", "global-output", "uniform-output", "threshold-output"]
DEFAULT_VARIANTS = ["global", "threshold", "uniform", "global-output", "uniform-output"]


# ---------------------------------------------------------------------------------------------
# Training the adapter


def train_adapter(model, tokenizer, out: Path, args: argparse.Namespace) -> None:
    """A LoRA of rank ``args.rank`` on every block linear, trained on calibration windows; saved to ``out``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(args.seed)
    windows = token_windows(tokenizer, load_texts("python-docs", "calibration"), args.train_seq_len,
                            args.train_steps * args.train_batch)
    windows = windows[torch.randperm(len(windows))]
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=TARGET_MODULES)
    peft_model = get_peft_model(model, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.train_steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / args.train_steps)))
    peft_model.train()
    bar = tqdm(windows.split(args.train_batch), desc="train LoRA", unit="step")
    for batch in bar:
        loss = peft_model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    peft_model.eval()
    peft_model.save_pretrained(out)
    peft_model.unload()


# ---------------------------------------------------------------------------------------------


def eval_loss(model, windows: torch.Tensor, batch_size: int) -> float:
    """Mean next-token loss (nats) under the project's evaluation protocol."""
    return perplexity(model, windows, batch_size, progress=False).nll


def evaluate_adapter(base, folder: Path, windows: torch.Tensor, batch_size: int) -> float:
    """Eval loss of ``base`` with the adapter in ``folder`` loaded by PEFT (the base is restored after)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, folder).eval()
    try:
        return eval_loss(model, windows, batch_size)
    finally:
        model.unload()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=Path, help="a trained PEFT adapter folder (default: train one, cached)")
    parser.add_argument("--keep", type=float, nargs="+", default=[0.25], help="fractions of LoRA parameters to keep")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_VARIANTS, choices=VARIANTS,
                        help="METHOD or METHOD-ERROR (error: relative, or output = calibrated)")
    parser.add_argument("--calib-windows", type=int, default=32, help="512-token windows for error=output")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--train-batch", type=int, default=2)
    parser.add_argument("--train-seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: the ranapass cache, lora-bench/")
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()

    args.cache_dir = args.cache_dir or cache_dir("lora-bench")
    base, tokenizer = load_model()
    adapter_dir = args.adapter or args.cache_dir / (f"adapter-r{args.rank}-s{args.train_steps}x{args.train_batch}"
                                                    f"x{args.train_seq_len}-lr{args.lr:g}-seed{args.seed}")
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        if args.adapter:
            raise SystemExit(f"{args.adapter} holds no adapter_model.safetensors")
        train_adapter(base, tokenizer, adapter_dir, args)
    windows = evaluation_windows(tokenizer, num_windows=args.eval_windows, window=args.eval_seq_len)

    full = load_lora(adapter_dir)
    calibration = None
    if any(name.endswith("-output") for name in args.methods):
        calibration = calibrate_lora(full, base, calibration_windows(tokenizer, num_windows=args.calib_windows))
    rows = [{"method": "base model", "params": 0, "loss": eval_loss(base, windows, args.batch_size)},
            {"method": "full LoRA", "params": full.num_parameters,
             "loss": evaluate_adapter(base, adapter_dir, windows, args.batch_size), "energy_kept": 1.0}]
    for keep in args.keep:
        for name in args.methods:
            method, _, error = name.partition("-")
            result = compress_lora(full, keep, method=method, error=error or "energy",
                                   calibration=calibration if error == "output" else None)
            out = args.cache_dir / "compressed" / f"{adapter_dir.name}-keep{keep:g}-{name}"
            result.adapter.save(out)
            rows.append({"method": name, "keep": keep, "params": result.params_after,
                         "energy_kept": result.energy_kept, "ranks": [m.kept for m in result.modules],
                         "loss": evaluate_adapter(base, out, windows, args.batch_size)})

    full_loss = rows[1]["loss"]
    print(f"adapter {adapter_dir} ({full.num_parameters:,} LoRA parameters, rank {args.rank})")
    print(f"eval: {protocol(num_windows=args.eval_windows, window=args.eval_seq_len)}")
    print(f"{'method':<16} {'keep':>5} {'LoRA params':>12} {'share':>7} {'energy':>7} {'eval loss':>10} "
          f"{'vs full':>8} {'ppl':>7}")
    for row in rows:
        share = row["params"] / full.num_parameters
        keep = f"{row['keep']:g}" if "keep" in row else "-"
        energy = f"{row['energy_kept']:.1%}" if "energy_kept" in row else "-"
        print(f"{row['method']:<16} {keep:>5} {row['params']:>12,} {share:>7.1%} {energy:>7} {row['loss']:>10.4f} "
              f"{row['loss'] - full_loss:>+8.4f} {math.exp(row['loss']):>7.3f}")
    payload = {
        "adapter": str(adapter_dir), "rank": args.rank,
        "eval": protocol(num_windows=args.eval_windows, window=args.eval_seq_len),
        "rows": rows, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "seconds": time.time() - started,
        "date": time.strftime("%Y-%m-%d"), "loadavg": os.getloadavg(),
    }
    if args.json:
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return payload


if __name__ == "__main__":
    main()
