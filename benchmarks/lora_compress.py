"""LoRA rank compression on a real adapter: evaluation loss before and after, by allocation method.

Trains (once, cached) a rank-16 LoRA on q, k, v, o, gate, up and down of SmolLM2-135M-Instruct over the
calibration split of the Python docs prose, then compresses it to ``--keep`` of its LoRA parameters with
each method (ranapass's global allocation, PARA's global singular-value threshold, uniform truncation)
and error (data-free; ``-output``: output error relative to the base layer's; ``-fisher``: second-order
loss change from output gradients; both calibrated on ``--calib-windows`` windows of the calibration
split, on the fine-tuned model), writes each result as a PEFT adapter, loads it back with
``PeftModel.from_pretrained`` and measures the mean next-token loss on held-out evaluation windows (the
project's evaluation protocol by default; ``--texts`` adds ``debian-handbook``, out of domain, and
``python-docs-calibration``, held-out windows of the calibration split: the distribution the adapter was
trained and calibrated on, in tokens the calibration never read).

Every adapter is scored on the same windows, so two of them are compared by the mean of their
per-window loss differences, whose standard error (std / sqrt(windows)) is printed beside it: the
paired error is what tells a difference of 0.0002 nats from noise.

    python benchmarks/lora_compress.py --threads 1 --keep 0.25 0.125 0.0625 --json results.json
    python benchmarks/lora_compress.py --adapter DIR        # an adapter of your own

Keeps that are whole ranks of the rank-16 adapter (0.25, 0.125, 0.0625: 4, 2, 1) compare uniform
truncation at exactly the same size. CPU only: training is 300 steps of 2 x 128 tokens, each evaluation
32 x 512 tokens; on a shared CPU pass --threads 1 (run times: benchmarks/RESULTS.md, "LoRA compression").
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
from ranapass.data import (calibration_windows, evaluation_windows, load_texts, token_windows, tokenize_stream,
                           window_starts)
from ranapass.evaluate import PerplexityResult, perplexity, protocol
from ranapass.lora import CALIBRATED_ERRORS, METHODS, calibrate_lora, compress_lora, load_lora
from ranapass.models import load_model

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# METHOD[-ERROR]: "global" is the data-free global allocation (discarded energy); "-output", "-fisher" are calibrated.
VARIANTS = [*METHODS, "global-relative", *(f"{m}-{e}" for e in CALIBRATED_ERRORS for m in METHODS)]
DEFAULT_VARIANTS = ["global", "threshold", "uniform", "global-output", "uniform-output", "global-fisher",
                    "uniform-fisher"]
HELDOUT = "python-docs-calibration"
TEXTS = ("python-docs", "debian-handbook", HELDOUT)
CALIB_WINDOW = 512


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
# Evaluation


def heldout_windows(tokenizer, calib_windows: int, window: int) -> torch.Tensor:
    """One ``window``-token window halfway between each two consecutive calibration windows of the calibration
    split: text of the distribution the adapter was trained and calibrated on that the calibration never read
    (training read 600 windows of 128 tokens spread over the same stream, so a few percent of it)."""
    stream = tokenize_stream(tokenizer, load_texts("python-docs", "calibration"))
    starts = window_starts(len(stream), CALIB_WINDOW, calib_windows)
    gap = starts[1] - starts[0] - CALIB_WINDOW
    if gap < window:
        raise SystemExit(f"{HELDOUT}: the calibration windows leave {gap} tokens between them, fewer than {window}")
    offset = CALIB_WINDOW + (gap - window) // 2
    return torch.stack([stream[s + offset:s + offset + window] for s in starts[:-1]])


def describe(text: str, windows: torch.Tensor, calib_windows: int) -> str:
    """The evaluation protocol of ``text``, in one line."""
    if text == HELDOUT:
        return (f"python-docs calibration split, {len(windows)} windows of {windows.shape[1]} tokens centred between "
                f"the {calib_windows} calibration windows (held out from calibration)")
    return protocol(text, num_windows=len(windows), window=windows.shape[1])


def eval_loss(model, windows: dict[str, torch.Tensor], batch_size: int) -> dict[str, dict]:
    """Per text, the mean next-token loss (nats) and each window's, under the project's evaluation protocol."""
    results: dict[str, PerplexityResult] = {t: perplexity(model, w, batch_size, progress=False)
                                            for t, w in windows.items()}
    return {t: {"loss": r.nll, "window_loss": list(r.window_nll)} for t, r in results.items()}


def evaluate_adapter(base, folder: Path, windows: dict[str, torch.Tensor], batch_size: int) -> dict[str, dict]:
    """:func:`eval_loss` of ``base`` with the adapter in ``folder`` loaded by PEFT (the base is restored after)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, folder).eval()
    try:
        return eval_loss(model, windows, batch_size)
    finally:
        model.unload()


def paired(a: dict, b: dict) -> tuple[float, float]:
    """(mean, standard error) of the per-window loss difference a - b over the same windows."""
    d = torch.tensor(a["window_loss"], dtype=torch.float64) - torch.tensor(b["window_loss"], dtype=torch.float64)
    return float(d.mean()), float(d.std() / math.sqrt(len(d)))


def comparisons(rows: list[dict], text: str) -> list[dict]:
    """Global allocation against uniform truncation with the same error, at each keep: the paired difference."""
    by_name = {(r["method"], r.get("keep")): r for r in rows}
    out = []
    for (name, keep), row in by_name.items():
        method, _, error = name.partition("-")
        other = by_name.get(("-".join(filter(None, ("uniform", error))), keep))
        if method == "global" and other is not None:
            diff, se = paired(row["eval"][text], other["eval"][text])
            out.append({"text": text, "keep": keep, "a": name, "b": other["method"], "diff": diff, "se": se})
    return out


def print_table(rows: list[dict], text: str, full_params: int) -> None:
    """One text's table: loss, its change against the full adapter and the paired standard error of that."""
    full = rows[1]["eval"][text]
    print(f"{'method':<16} {'keep':>5} {'LoRA params':>12} {'share':>7} {'energy':>7} {'predicted':>9} "
          f"{'eval loss':>10} {'vs full':>8} {'± se':>7} {'ppl':>7}")
    for row in rows:
        share = row["params"] / full_params
        keep = f"{row['keep']:g}" if "keep" in row else "-"
        energy = f"{row['energy_kept']:.1%}" if "energy_kept" in row else "-"
        predicted = row.get("predicted_loss_change")
        predicted = "-" if predicted is None else f"{predicted:+.4f}"
        diff, se = paired(row["eval"][text], full)
        loss = row["eval"][text]["loss"]
        print(f"{row['method']:<16} {keep:>5} {row['params']:>12,} {share:>7.1%} {energy:>7} "
              f"{predicted:>9} {loss:>10.4f} {diff:>+8.4f} {se:>7.4f} {math.exp(loss):>7.3f}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=Path, help="a trained PEFT adapter folder (default: train one, cached)")
    parser.add_argument("--keep", type=float, nargs="+", default=[0.25], help="fractions of LoRA parameters to keep")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_VARIANTS, choices=VARIANTS,
                        help="METHOD or METHOD-ERROR (error: relative, or output / fisher = calibrated)")
    parser.add_argument("--calib-windows", type=int, default=32,
                        help="512-token windows for error=output and fisher (fisher: one backward pass each)")
    parser.add_argument("--texts", nargs="+", default=["python-docs"], choices=TEXTS,
                        help="evaluation texts (python-docs: the protocol; debian-handbook: out of domain; "
                             f"{HELDOUT}: held-out windows of the calibration split)")
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
    windows = {t: heldout_windows(tokenizer, args.calib_windows, args.eval_seq_len) if t == HELDOUT else
               evaluation_windows(tokenizer, t, num_windows=args.eval_windows, window=args.eval_seq_len)
               for t in args.texts}

    full = load_lora(adapter_dir)
    errors = {name.partition("-")[2] for name in args.methods}
    calibration = None
    if errors & set(CALIBRATED_ERRORS):
        calib = calibration_windows(tokenizer, num_windows=args.calib_windows, window=CALIB_WINDOW)
        calibration = calibrate_lora(full, base, calib, gradient_data=calib if "fisher" in errors else None)
    rows = [{"method": "base model", "params": 0, "eval": eval_loss(base, windows, args.batch_size)},
            {"method": "full LoRA", "params": full.num_parameters,
             "eval": evaluate_adapter(base, adapter_dir, windows, args.batch_size), "energy_kept": 1.0}]
    for keep in args.keep:
        for name in args.methods:
            method, _, error = name.partition("-")
            result = compress_lora(full, keep, method=method, error=error or "energy",
                                   calibration=calibration if error in CALIBRATED_ERRORS else None)
            out = args.cache_dir / "compressed" / f"{adapter_dir.name}-keep{keep:g}-{name}"
            result.adapter.save(out)
            rows.append({"method": name, "keep": keep, "params": result.params_after,
                         "energy_kept": result.energy_kept, "predicted_loss_change": result.predicted_loss_change,
                         "ranks": [m.kept for m in result.modules],
                         "eval": evaluate_adapter(base, out, windows, args.batch_size)})

    print(f"adapter {adapter_dir} ({full.num_parameters:,} LoRA parameters, rank {args.rank})")
    pairs = []
    for text in args.texts:
        print(f"\neval: {describe(text, windows[text], args.calib_windows)}")
        print_table(rows, text, full.num_parameters)
        pairs += comparisons(rows, text)
    print("\nglobal allocation - uniform truncation, same error (paired over windows; negative: global is better)")
    for c in pairs:
        print(f"{c['text']:<16} keep {c['keep']:<6g} {c['a']:<16} - {c['b']:<16} {c['diff']:+.5f} ± {c['se']:.5f}")
    payload = {
        "adapter": str(adapter_dir), "rank": args.rank, "calib_windows": args.calib_windows,
        "eval": {t: describe(t, w, args.calib_windows) for t, w in windows.items()},
        "rows": rows, "comparisons": pairs, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "seconds": time.time() - started,
        "date": time.strftime("%Y-%m-%d"), "loadavg": os.getloadavg(),
    }
    if args.json:
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return payload


if __name__ == "__main__":
    main()
