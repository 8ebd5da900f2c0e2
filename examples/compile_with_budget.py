"""Profile SmolLM2 once, plan at 56% of the block-linear FLOPs, compile with ranapass, compare perplexity.

    python examples/compile_with_budget.py [budget]
"""

import sys

import torch

import ranapass

budget = float(sys.argv[1]) if len(sys.argv) > 1 else 0.56
model, tokenizer = ranapass.load_model()                          # SmolLM2-135M-Instruct, offline
profile = ranapass.profile(model, ranapass.calibration_windows(tokenizer, num_windows=128))  # cached
plan = profile.plan(budget=budget)                                # global allocation + fitted thresholds
print(plan.summary())

windows = ranapass.evaluation_windows(tokenizer, num_windows=8)
print("dense   ", ranapass.perplexity(model, windows).ppl)
ranapass.attach(model, plan)                                      # registers adapters by weight identity
fast = torch.compile(model, backend=ranapass.rana_backend)        # or backend="rana"
print("compiled", ranapass.perplexity(fast, windows).ppl)
