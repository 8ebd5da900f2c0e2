"""Shrink a trained LoRA adapter to a quarter of its parameters, then load it with PEFT.

    python examples/lora_compress.py ADAPTER_DIR OUT_DIR [--keep 0.25] [--base MODEL]

Ranks are allocated across the whole network (ranapass's global allocator on each update's
singular values); PARA's global threshold and uniform truncation are printed beside it. The same
works on an in-memory ``PeftModel``: ``ranapass.compress_lora(peft_model, keep=0.25)``.
"""

import argparse

import ranapass

parser = argparse.ArgumentParser()
parser.add_argument("adapter", help="PEFT adapter folder")
parser.add_argument("out", help="folder for the compressed adapter")
parser.add_argument("--keep", type=float, default=0.25, help="fraction of LoRA parameters to keep")
parser.add_argument("--base", help="base model (path or id) to load the result on, as a check")
args = parser.parse_args()

adapter = ranapass.load_lora(args.adapter)
for method in ("global", "threshold", "uniform"):
    r = ranapass.compress_lora(adapter, args.keep, method=method)
    print(f"{method:>9}: {r.params_after:,} of {r.params_before:,} LoRA parameters, {r.energy_kept:.1%} of ΔW energy")

result = ranapass.compress_lora(adapter, args.keep, method="global")
print(result.summary())
result.adapter.save(args.out)  # adapter_config.json (rank_pattern, alpha_pattern) + adapter_model.safetensors

if args.base:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(args.base), args.out)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    print(f"loaded on {args.base}: {lora:,} LoRA parameters")
