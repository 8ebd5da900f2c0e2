"""Time a whole decode step of a Llama-architecture model, dense vs ranapass, under torch.compile.

Random weights in the model's dtype (speed only: the tokens mean nothing). The plan is built here
from the weights, not calibrated on text: rank adapters on q/k/v (grouped, one B and one mask) and
on gate and up, neuron adapters on o and down (down fused with SiLU·mul by the backend). Every rank
adapter has ``nB = hidden/2`` ranks with a random orthonormal ``A`` and ``B = A^T W``; thresholds are
per-rank / per-input quantiles of the scores on 4 x 256 random tokens, fitted unit by unit on the
adapted model's own activations, for one kept fraction shared by all units, chosen so the plan's
expected FLOPs (cost_model/flops.py, mask cost included) are ``--budget`` times the dense FLOPs of the
block linears. The FLOP ratio measured on the adapted model is reported beside it, on the
calibration tokens (the budget, by construction) and on 256 held-out tokens.

Both variants run the same harness (reference/gpu_dense_decode.md): a ``StaticCache`` allocated by an
eager prefill, then ``torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)`` — with
``backend=RanaBackend(strict=True)`` for ranapass — timed over ``--steps`` greedy decode steps (CUDA
events, argmax included), median of 3 repeats. Cudagraph skips, graph breaks and recompiles come
from Dynamo's counters; a per-kernel profile of one step says where the time goes. ``--inductor-pdl``
turns on programmatic dependent launch in Inductor's kernels for every variant, dense included (the
same compile options for both), which is when ranapass hands Inductor its opaque PDL decode ops.

Usage::

    python benchmarks/bench_decode.py [--model llama2-7b|llama3-8b|smollm2] [--layers N]
        [--batches 1 2 4 8] [--budget 0.56] [--max-cache-len 2048] [--tuned tuned.json] [--unpaired]
        [--inductor-pdl] [--no-pdl] [--ticket-fill] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    LLAMA2_7B,
    LLAMA3_8B,
    SMOLLM2_135M,
    ModelShape,
    block_units,
    copy_bandwidth,
    env_info,
    kept_fraction_for_budget,
    load_tuned,
    markdown_table,
    pdl_off,
)
from ranapass import FlopMeter, NeuronAdapterSpec, Plan, RankAdapterSpec, UnitPlan, attach, detach  # noqa: E402
from ranapass import weights_fingerprint  # noqa: E402

MODELS = {"llama2-7b": LLAMA2_7B, "llama3-8b": LLAMA3_8B, "smollm2": SMOLLM2_135M}
ROPE_THETA = {"Llama-2-7B": 10000.0, "Llama-3-8B": 500000.0, "SmolLM2-135M": 100000.0}


# ------------------------------------------------------------------------------------------ model
def build_model(shape: ModelShape, layers: int, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """A random-weight ``LlamaForCausalLM`` of these shapes, built on the meta device then materialised."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=layers,
                         num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                         vocab_size=shape.vocab, tie_word_embeddings=shape.tie_embeddings,
                         max_position_embeddings=8192, rope_theta=ROPE_THETA[shape.name],
                         attn_implementation="sdpa", dtype=dtype)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
        # to_empty leaves buffers (rotary inv_freq) uninitialised and unties tied embeddings
        with torch.device(device):
            model.model.rotary_emb = LlamaRotaryEmbedding(config)
        if shape.tie_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
    return model.to(dtype).eval()


# ------------------------------------------------------------------------------------------ plan
@torch.no_grad()
def build_plan(model: torch.nn.Module, shape: ModelShape, budget: float, prompt: torch.Tensor) -> Plan:
    """Rank adapters on qkv/gate/up, neuron adapters on o/down, one kept fraction meeting ``budget``.

    Thresholds are fitted unit by unit in one pass of the adapted model over ``prompt``: a pre-hook
    on each unit's first linear sets its thresholds from the scores of the input it actually gets,
    in which every earlier unit already runs with its final thresholds. So every unit keeps exactly
    the planned fraction on the prompt, and the measured FLOP ratio is the budget there.
    """
    keep = kept_fraction_for_budget(block_units(shape), budget)
    gen = torch.Generator(device=prompt.device).manual_seed(1)
    units = []
    for i, layer in enumerate(model.model.layers):
        pre = f"model.layers.{i}"
        attn, mlp = layer.self_attn, layer.mlp
        qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
        units.append(_rank_unit(f"{pre}.self_attn.{{q,k,v}}_proj", [f"{pre}.self_attn.{p}_proj" for p in "qkv"],
                                [m.weight for m in qkv], keep, gen))
        units.append(_neuron_unit(f"{pre}.self_attn.o_proj", attn.o_proj.weight, keep))
        for p in ("gate", "up"):
            units.append(_rank_unit(f"{pre}.mlp.{p}_proj", [f"{pre}.mlp.{p}_proj"], [getattr(mlp, f"{p}_proj").weight],
                                    keep, gen))
        units.append(_neuron_unit(f"{pre}.mlp.down_proj", mlp.down_proj.weight, keep))
    plan = Plan(units, budget=budget, allocation="benchmark: one kept fraction for all units",
                fingerprint=weights_fingerprint(model), meta={"kept_fraction": keep})
    attachment = attach(model, plan)

    def fit(unit: UnitPlan):
        bound = attachment.refs[unit.members[0]].adapter

        def hook(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            scores = x @ bound.buffers["B"].float().t() if isinstance(unit.adapter, RankAdapterSpec) else x
            unit.adapter.thresholds = _quantile_per_column(scores, keep)
            bound.buffers["thresholds"].copy_(unit.adapter.thresholds)

        return hook

    hooks = [model.get_submodule(u.members[0]).register_forward_pre_hook(fit(u)) for u in units]
    try:
        with attachment.eager():
            model(prompt)
    finally:
        for h in hooks:
            h.remove()
        detach(model)
    return plan


def _quantile_per_column(scores: torch.Tensor, keep: float) -> torch.Tensor:
    """Per-column thresholds keeping ``keep`` of each column's |scores| ([N, k] -> [k] float32)."""
    if keep >= 1.0:
        return torch.zeros(scores.shape[1], device=scores.device)
    return torch.quantile(scores.abs().float(), 1.0 - keep, dim=0).contiguous()


def _rank_unit(name: str, members: list[str], weights: list[torch.Tensor], keep: float,
               gen: torch.Generator) -> UnitPlan:
    W = torch.cat([w.float() for w in weights])                          # [m, n]
    m, n = W.shape
    rank = n // 2
    A, _ = torch.linalg.qr(torch.randn(m, rank, device=W.device, generator=gen))  # orthonormal columns
    B = A.t() @ W                                                        # [rank, n]
    spec = RankAdapterSpec(members=tuple(members), out_features=tuple(w.shape[0] for w in weights), in_features=n,
                           tau=1.0, B=B, At=A.t().contiguous(), thresholds=torch.zeros(rank, device=W.device))
    return UnitPlan(name, tuple(members), spec.out_features, n, spec, expected_kept=keep * rank)


def _neuron_unit(name: str, weight: torch.Tensor, keep: float) -> UnitPlan:
    m, n = weight.shape
    spec = NeuronAdapterSpec(members=(name,), out_features=(m,), in_features=n, tau=1.0,
                             thresholds=torch.zeros(n, device=weight.device))
    return UnitPlan(name, (name,), (m,), n, spec, expected_kept=keep * n)


# ------------------------------------------------------------------------------------------ timing
class Decoder:
    """Eager prefill into a StaticCache, then compiled one-token decode steps (greedy)."""

    def __init__(self, model, batch: int, max_cache_len: int, backend=None):
        from transformers import StaticCache

        self.model = model
        params = inspect.signature(model.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
        self.batch = batch
        kwargs = {"mode": "reduce-overhead", "fullgraph": True}
        if backend is not None:
            kwargs["backend"] = backend
        self.step = torch.compile(model.forward, **kwargs)

    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        self.cache.reset()
        out = self.model(input_ids=prompt, use_cache=True, **{self.cache_kwarg: self.cache})
        return out.logits[:, -1:].argmax(-1)

    def decode(self, tok: torch.Tensor, steps: int) -> torch.Tensor:
        for _ in range(steps):
            torch.compiler.cudagraph_mark_step_begin()
            out = self.step(input_ids=tok, use_cache=True, **{self.cache_kwarg: self.cache})
            tok = out.logits[:, -1:].argmax(-1)
        return tok


@torch.no_grad()
def time_decode(dec: Decoder, prompt: torch.Tensor, steps: int, repeats: int = 3) -> dict:
    t0 = time.time()
    tok = dec.prefill(prompt)
    dec.decode(tok, 3)                                  # compile, record, replay
    torch.cuda.synchronize()
    compile_s = time.time() - t0
    tok = dec.prefill(prompt)
    dec.decode(tok, steps)                              # one untimed warm repeat
    times = []
    for _ in range(repeats):
        tok = dec.prefill(prompt)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dec.decode(tok, steps)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / steps)
    ms = sorted(times)[len(times) // 2]
    return {"ms_per_step": ms, "tok_per_s": dec.batch * 1e3 / ms, "steps_per_s": 1e3 / ms,
            "spread": (max(times) - min(times)) / ms, "compile_s": compile_s}


@torch.no_grad()
def step_profile(dec: Decoder, prompt: torch.Tensor, top: int = 12) -> list[dict]:
    """Device time per kernel name over 8 replayed decode steps (compiled step already warm)."""
    from torch.profiler import ProfilerActivity, profile

    tok = dec.prefill(prompt)
    dec.decode(tok, 2)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        dec.decode(tok, 8)
        torch.cuda.synchronize()
    per: dict[str, float] = {}
    for e in prof.key_averages():
        if e.device_type.name == "CUDA":
            per[e.key] = per.get(e.key, 0.0) + e.self_device_time_total / 8
    total = sum(per.values())
    rows = [{"kernel": k[:60], "us_per_step": v, "share": v / total} for k, v in sorted(per.items(), key=lambda kv: -kv[1])]
    return rows[:top] + [{"kernel": "(all kernels)", "us_per_step": total, "share": 1.0}]


def counters_snapshot() -> dict:
    from torch._dynamo.utils import counters

    return {"cudagraph_skips": int(counters["inductor"].get("cudagraph_skips", 0)),
            "graph_breaks": int(sum(counters["graph_break"].values())),
            "unique_graphs": int(counters["stats"].get("unique_graphs", 0))}


@torch.no_grad()
def measured_ratio(model, plan: Plan, prompt: torch.Tensor) -> float:
    """FLOP ratio of the block linears measured on the adapted model (eager adapters, kept ranks counted)."""
    attachment = attach(model, plan)
    with attachment.eager(), FlopMeter() as meter:
        model(prompt)
    return meter.ratio(plan)


def run_model(shape: ModelShape, layers: int, batches: list[int], args) -> list[dict]:
    from torch._dynamo.utils import counters

    from ranapass.backend import RanaBackend

    dtype = torch.bfloat16
    rows = []
    model = build_model(shape, layers, dtype, "cuda")
    gen = torch.Generator(device="cuda").manual_seed(2)
    calib = torch.randint(0, shape.vocab, (4, 256), device="cuda", generator=gen)
    held_out = torch.randint(0, shape.vocab, (1, 256), device="cuda", generator=gen)
    plan = build_plan(model, shape, args.budget, calib)
    ratio, held_out_ratio = measured_ratio(model, plan, calib), measured_ratio(model, plan, held_out)
    detach(model)
    print(f"{shape.name} x{layers}: plan expected ratio {plan.expected_ratio():.4f}, measured {ratio:.4f} on the "
          f"calibration tokens, {held_out_ratio:.4f} on held-out tokens", flush=True)
    for batch in batches:
        prompt = torch.randint(0, shape.vocab, (batch, args.prompt_len), device="cuda", generator=gen)
        variants = ["dense", "ranapass"] + (["ranapass, gate and up unpaired"] if args.unpaired and batch == 1 else [])
        variants += ["ranapass, no PDL"] if args.no_pdl and batch == 1 else []
        variants += ["ranapass, ticket fill per call"] if args.ticket_fill and batch == 1 else []
        for variant in variants:
            torch._dynamo.reset()
            counters.clear()
            with pdl_off() if variant == "ranapass, no PDL" else contextlib.nullcontext():
                backend = None
                if variant != "dense":
                    attachment = attach(model, plan)
                    if variant == "ranapass, ticket fill per call":  # the neuron ops without persistent tickets
                        for bound in attachment.adapters.values():
                            if "tickets" in bound.buffers:
                                bound.buffers["tickets"] = None
                    backend = RanaBackend(strict=True, pair_adapters=variant != "ranapass, gate and up unpaired")
                dec = Decoder(model, batch, args.max_cache_len, backend)
                r = time_decode(dec, prompt, args.steps)
                if backend is not None:
                    backend.check(model)
                r.update(counters_snapshot())
                r.update({"model": shape.name, "layers": layers, "batch": batch, "variant": variant,
                          "max_cache_len": args.max_cache_len, "expected_ratio": plan.expected_ratio(),
                          "measured_ratio": ratio, "held_out_ratio": held_out_ratio})
                if batch == 1 and args.profile:
                    r["profile"] = step_profile(dec, prompt)
                rows.append(r)
                print({k: v for k, v in r.items() if k != "profile"}, flush=True)
                del dec
                detach(model)
                torch.cuda.empty_cache()
        dense = rows[-len(variants)]
        for r in rows[-len(variants) + 1:]:
            r["speedup"] = r["tok_per_s"] / dense["tok_per_s"]
    del model
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", choices=sorted(MODELS), help="repeatable; default llama2-7b")
    ap.add_argument("--layers", type=int, default=0, help="decoder layers (0: the model's own)")
    ap.add_argument("--batched-layers", type=int, default=0,
                    help="layers for the batch > 1 runs (0: same as --layers); fewer layers cut compile time")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--budget", type=float, default=0.56)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-cache-len", type=int, default=2048)
    ap.add_argument("--profile", action="store_true", help="per-kernel profile of one batch-1 step")
    ap.add_argument("--tuned", help="tile table written by bench_kernels.py --tune (into configs.TUNED)")
    ap.add_argument("--unpaired", action="store_true",
                    help="batch 1 also without rank_adapter_pair (gate and up in launches of their own)")
    ap.add_argument("--inductor-pdl", action="store_true",
                    help="every variant with programmatic dependent launch in Inductor's kernels "
                         "(triton.enable_pdl, as TORCHINDUCTOR_ENABLE_PDL=1); ranapass's decode ops then use it too")
    ap.add_argument("--no-pdl", action="store_true",
                    help="batch 1 also with RANAPASS_PDL=0 (Inductor launches the traced kernels itself)")
    ap.add_argument("--ticket-fill", action="store_true",
                    help="batch 1 also with the neuron ops' tickets filled per call instead of kept zero across calls")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = ap.parse_args()
    try:
        import ranapass.backend  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"bench_decode.py needs ranapass.backend (the torch.compile backend): {e}") from e
    if args.inductor_pdl:
        from torch._inductor import config as inductor_config

        inductor_config.triton.enable_pdl = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"env": env_info(), "copy_gbps": copy_bandwidth(), "args": vars(args), "runs": []}
    if args.tuned:
        res["tuned"] = {" ".join(map(str, k)): str(c) for k, c in load_tuned(args.tuned).items()}
        print("tuned tiles:", res["tuned"], flush=True)
    for name in args.model or ["llama2-7b"]:
        shape = MODELS[name]
        layers = args.layers or shape.layers
        res["runs"] += run_model(shape, layers, [b for b in args.batches if b == 1], args)
        rest = [b for b in args.batches if b != 1]
        if rest:
            res["runs"] += run_model(shape, args.batched_layers or layers, rest, args)
        (out / "decode.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "decode.md").write_text(report(res))
    print(report(res))


def report(res: dict) -> str:
    e = res["env"]
    cols = ["model", "layers", "batch", "variant", "ms_per_step", "tok_per_s", "speedup", "expected_ratio",
            "measured_ratio", "held_out_ratio", "cudagraph_skips", "graph_breaks", "compile_s", "spread"]
    parts = [f"card {e['card']}, torch {e['torch']}, triton {e['triton']}, transformers {e.get('transformers')}, "
             f"{e['date']}; copy {res['copy_gbps']:.0f} GB/s; command `{e['command']}`", "",
             markdown_table([{k: (v if not (isinstance(v, float) and math.isnan(v)) else "") for k, v in r.items()}
                             for r in res["runs"]], cols)]
    if res.get("tuned"):
        parts += ["", "tiles from configs.TUNED: " + "; ".join(f"{k}: {v}" for k, v in res["tuned"].items())]
    for r in res["runs"]:
        if "profile" in r:
            parts += ["", f"### profile: {r['model']} x{r['layers']}, batch {r['batch']}, {r['variant']}",
                      markdown_table(r["profile"], ["kernel", "us_per_step", "share"])]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    main()
