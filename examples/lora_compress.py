"""Shrink a trained LoRA adapter to a quarter of its parameters, then load it with PEFT.

    python examples/lora_compress.py ADAPTER_DIR OUT_DIR [--keep 0.25] [--base MODEL]

Ranks are allocated across the whole network by ranapass's global allocator. Without ``--base`` it is
data-free (each update's singular values); with the base model it runs the fine-tuned model on
calibration text, one backward pass per window, and charges each truncation its second-order loss
change (``error="fisher"``), which kept the evaluation loss lowest on SmolLM2 (README, LoRA section).
The same works on an in-memory ``PeftModel``: ``ranapass.compress_lora(peft_model, keep=0.25)``.
"""

import argparse

import ranapass

parser = argparse.ArgumentParser()
parser.add_argument("adapter", help="PEFT adapter folder")
parser.add_argument("out", help="folder for the compressed adapter")
parser.add_argument("--keep", type=float, default=0.25, help="fraction of LoRA parameters to keep")
parser.add_argument("--base", help="the adapter's base model (name, folder or id): calibrate, then load the result")
args = parser.parse_args()

adapter = ranapass.load_lora(args.adapter)
for method in ("global", "threshold", "uniform"):  # data-free: ranapass, PARA's threshold, uniform
    r = ranapass.compress_lora(adapter, args.keep, method=method)
    print(f"{method:>9}: {r.params_after:,} of {r.params_before:,} LoRA parameters, {r.energy_kept:.1%} of ΔW energy")

if args.base:
    model, tokenizer = ranapass.load_model(args.base)
    windows = ranapass.calibration_windows(tokenizer, num_windows=32)
    calibration = ranapass.calibrate_lora(adapter, model, windows, gradient_data=windows)
    result = ranapass.compress_lora(adapter, args.keep, error="fisher", calibration=calibration)
else:
    result = ranapass.compress_lora(adapter, args.keep)
print(result.summary())
result.adapter.save(args.out)  # adapter_config.json (rank_pattern, alpha_pattern) + adapter_model.safetensors

if args.base:
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, args.out)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    print(f"loaded on {args.base}: {lora:,} LoRA parameters")
