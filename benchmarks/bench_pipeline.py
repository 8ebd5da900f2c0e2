"""The whole product path on one model, as a user runs it: profile, plan, attach, compile, generate.

A Llama-architecture model built from its config (Llama-2-7B or Llama-3-8B shapes, ``--layers`` to
keep fewer decoder layers) with random weights in bf16 on the GPU (fp32 on a CPU), its vocabulary
resized to the SmolLM2 tokenizer's. It is calibrated with the real ``ranapass.profile`` on
``--windows`` x ``--window-len`` tokens of the Python-docs calibration split, planned by the real
allocator at each ``--budgets`` value (``Profile.plan``), and next to those plans runs the hand-built
plan of ``bench_decode.py`` (one kept fraction everywhere) at the first budget, so the difference
between the two kinds of plan is measured in the same run.

Every variant, dense included, generates through ``CompiledGenerator`` with the same backend
options and compile mode (dense: the backend's compiler without the rewrite): greedy decode of
``--steps`` tokens after a ``--prompt-len`` prompt at each of ``--batches``, and a prefill of
``--prefill-len`` tokens at batch 1 in each of ``--prefill-modes``; one warm-up call compiles (timed as
compile seconds), then the median of ``--repeats`` (prefill: ``--prefill-repeats``) calls is reported,
for the prefill also its launch time (until the compiled call returned, kernels queued: near the whole
prefill when the host sets the pace). Recorded: profile seconds and peak GPU memory
(``torch.cuda.max_memory_allocated``), plan seconds, compile seconds, graphs compiled per phase
(recompiles = graphs beyond one), cudagraph skips and graph breaks (Dynamo's counters), decode and
prefill tokens per second with the speedup over dense, each plan's kind/rank mix per projection,
its FLOP ratio measured on held-out text (the evaluation split), and the FLOP ratio of the tokens the
decode steps actually fed (the generated ones: a plan's thresholds were fitted on text, and a model with
random weights generates no text). ``--breakdown`` adds, per decode step, the GPU time of every kernel
(torch.profiler over two generate calls of different lengths, so prefill and set-up cancel), grouped into
ranapass's kernels, cuBLAS, attention, Inductor's fused kernels and the rest, with launch counts, and the
same for one prefill (its GPU milliseconds beside the wall and launch time).

The tokenizer and token windows need the SmolLM2 package and Python's docs; ``--inputs DIR`` saves
them there the first time (``--prepare-only`` stops after that) and reads them from there later,
for a machine that has neither.

Usage::

    python benchmarks/bench_pipeline.py [--model llama2-7b|llama3-8b|tiny] [--layers N] [--windows 128]
        [--window-len 512] [--budgets 0.56 0.7] [--batches 1 4] [--steps 64] [--inputs DIR]
        [--prepare-only] [--compiler inductor|aot_eager] [--max-cache-len N ...] [--breakdown]
        [--prefill-modes default reduce-overhead] [--prefill-repeats 10] [--out DIR]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_decode  # noqa: E402
from bench_decode import build_model, counters_snapshot, measured_ratio  # noqa: E402
from common import LLAMA2_7B, LLAMA3_8B, ModelShape, env_info, markdown_table  # noqa: E402

import ranapass  # noqa: E402
from ranapass import CompiledGenerator, RanaBackend, attach, detach  # noqa: E402
from ranapass.attach import FlopMeter  # noqa: E402

TINY = ModelShape("tiny", hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=0)
MODELS = {"llama2-7b": LLAMA2_7B, "llama3-8b": LLAMA3_8B, "tiny": TINY}
bench_decode.ROPE_THETA.setdefault(TINY.name, 10000.0)  # bench_decode knows the real models' rope bases
HELD_OUT_WINDOWS = 4


# ------------------------------------------------------------------------------------------ inputs
def load_inputs(args) -> tuple[object, dict[str, torch.Tensor]]:
    """The SmolLM2 tokenizer and the token windows: calibration, held-out (evaluation split)."""
    from transformers import AutoTokenizer

    folder = Path(args.inputs) if args.inputs else None
    if folder is not None and (folder / "windows.pt").is_file():
        windows = torch.load(folder / "windows.pt")
        if tuple(windows["calibration"].shape) != (args.windows, args.window_len):
            raise SystemExit(f"{folder}/windows.pt holds {tuple(windows['calibration'].shape)} calibration tokens, "
                             f"not {args.windows} x {args.window_len}: pass another --inputs folder")
        return AutoTokenizer.from_pretrained(folder), windows
    tokenizer = ranapass.load_model()[1]
    length = max(args.window_len, args.prefill_len, args.prompt_len)
    windows = {"calibration": ranapass.calibration_windows(tokenizer, num_windows=args.windows, window=args.window_len),
               "held_out": ranapass.evaluation_windows(tokenizer, num_windows=max(HELD_OUT_WINDOWS, *args.batches),
                                                       window=length)}
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(folder)
        torch.save(windows, folder / "windows.pt")
    return tokenizer, windows


# ------------------------------------------------------------------------------------------ plans
def plan_mix(plan: ranapass.Plan) -> dict[str, dict]:
    """Per projection (the unit name without its layer prefix): units of each kind, mean rank and kept fractions."""
    groups: dict[tuple[str, str], list] = collections.defaultdict(list)
    for unit in plan.units:
        groups[(unit.name.split(".", 3)[-1], unit.kind)].append(unit)
    mix: dict[str, dict] = {}
    for (proj, kind), units in sorted(groups.items()):
        entry = {"units": len(units)}
        if kind == "rank":
            ranks = [u.adapter.rank / min(sum(u.out_features), u.in_features) for u in units]
            entry["rank_fraction"] = statistics.mean(ranks)
            entry["kept_of_rank"] = statistics.mean(u.expected_kept / u.adapter.rank for u in units)
        elif kind == "neuron":
            entry["kept_of_inputs"] = statistics.mean(u.expected_kept / u.in_features for u in units)
        mix.setdefault(proj, {})[kind] = entry
    return mix


def make_plans(model, shape: ModelShape, windows: dict[str, torch.Tensor], args) -> tuple[dict, list[dict]]:
    """Profile once, plan at every budget, build the hand-made plan: ``{name: plan}`` and one row per plan."""
    device = next(model.parameters()).device
    calibration = windows["calibration"].to(device)
    held_out = windows["held_out"][:HELD_OUT_WINDOWS].to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    profile = ranapass.profile(model, calibration, cache=False)
    profile_row = {"profile_seconds": time.perf_counter() - start, "profile_peak_gib": _peak_gib(device),
                   "calibration": f"{calibration.shape[0]} x {calibration.shape[1]} tokens"}
    print(f"profile: {profile_row}", flush=True)
    plans, rows = {}, []
    for budget in args.budgets:
        start = time.perf_counter()
        plans[f"allocator {budget}"] = profile.plan(budget)
        rows.append({"plan": f"allocator {budget}", "plan_seconds": time.perf_counter() - start})
    if not args.no_hand:
        budget = args.budgets[0]
        start = time.perf_counter()
        plans[f"hand-built {budget}"] = bench_decode.build_plan(model, shape, budget, calibration[:4, :256])
        rows.append({"plan": f"hand-built {budget}", "plan_seconds": time.perf_counter() - start})
    for row in rows:
        plan = plans[row["plan"]]
        row.update({"expected_ratio": plan.expected_ratio(), "held_out_ratio": measured_ratio(model, plan, held_out),
                    "units_adapted": len(plan.adapted), "units": len(plan.units), "mix": plan_mix(plan)})
        detach(model)
        print({k: v for k, v in row.items() if k != "mix"}, flush=True)
    return plans, [{"plan": "profile", **profile_row}] + rows


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


# ------------------------------------------------------------------------------------------ timing
KERNEL_GROUPS = (
    ("ranapass", ("masked_gemv", "router_kernel", "split_sum")),
    ("cuBLAS", ("gemv", "gemm", "cutlass", "xmma", "cublas", "nvjet")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "efficient")),
    ("inductor", ("triton_",)),
)


def _kernel_group(name: str) -> str:
    low = name.lower()
    return next((group for group, keys in KERNEL_GROUPS if any(k in low for k in keys)), "other")


def _kernel_times(gen: CompiledGenerator, prompt: torch.Tensor, new_tokens: int) -> tuple[dict, dict]:
    """GPU microseconds and launches per kernel name over one ``generate`` call."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        gen.generate(prompt, new_tokens)
    times: dict[str, float] = collections.defaultdict(float)
    launches: dict[str, int] = collections.defaultdict(int)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            times[event.name] += event.device_time
            launches[event.name] += 1
    return times, launches


def _grouped(times: dict[str, float], launches: dict[str, float]) -> dict:
    groups: dict[str, float] = collections.defaultdict(float)
    group_launches: dict[str, float] = collections.defaultdict(float)
    for name, us in times.items():
        groups[_kernel_group(name)] += us
        group_launches[_kernel_group(name)] += launches[name]
    top = sorted(times.items(), key=lambda kv: -kv[1])[:12]
    return {"gpu_us": sum(times.values()), "groups_us": dict(groups), "launches": sum(launches.values()),
            "group_launches": dict(group_launches), "top_kernels_us": [(name[:90], us) for name, us in top]}


def decode_breakdown(gen: CompiledGenerator, prompt: torch.Tensor, steps: int = 32) -> dict:
    """GPU microseconds per decode step by kernel group and the top kernels: the difference of two calls
    ``steps`` decode steps apart, so the prefill and everything paid once per call cancel."""
    (short, short_n), (long, long_n) = _kernel_times(gen, prompt, 9), _kernel_times(gen, prompt, 9 + steps)
    return _grouped({k: (long[k] - short.get(k, 0.0)) / steps for k in long},
                    {k: (long_n[k] - short_n.get(k, 0)) / steps for k in long})


def prefill_breakdown(gen: CompiledGenerator, prompt: torch.Tensor) -> dict:
    """GPU microseconds of one prefill (a ``generate`` call of one new token) by kernel group and the top kernels."""
    return _grouped(*_kernel_times(gen, prompt, 1))


@torch.no_grad()
def decoded_ratio(model, plan, sequences: torch.Tensor, prompt_len: int) -> float:
    """The plan's FLOP ratio over the generated positions of ``sequences`` only: eager masks on the whole
    sequences minus those on their prompts (a causal model computes the prompt's the same way in both)."""
    def kept(ids):
        attachment = attach(model, plan)
        with attachment.eager(), FlopMeter() as meter:
            model(ids)
        detach(model)
        return meter
    whole, head = kept(sequences), kept(sequences[:, :prompt_len])
    dense = plan.dense_flops()
    flops = 0.0
    for unit in plan.units:
        if unit.adapter is None:
            flops += unit.dense_flops
        else:
            tokens = whole.tokens[unit.name] - head.tokens[unit.name]
            flops += unit.flops((whole.kept[unit.name] - head.kept[unit.name]) / tokens)
    return flops / dense


def prefill_cache_len(tokens: int) -> int:
    """The prefill generator's cache room: the power of two that holds the prompt and its one new token."""
    return 1 << tokens.bit_length()


@torch.no_grad()
def time_generation(model, prompt: torch.Tensor, new_tokens: int, cache_len: int, args,
                    prefill_mode: str | None = None) -> dict:
    """Compile (one warm-up call), then the median of ``--repeats`` (decode) or ``--prefill-repeats``
    (prefill: one new token) timed calls of one fresh generator."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    gen = CompiledGenerator(model, max_cache_len=cache_len, batch_size=prompt.shape[0],
                            backend=RanaBackend(strict=True, compiler=args.compiler), prefill_mode=prefill_mode)
    start = time.perf_counter()
    sequences = gen.generate(prompt, new_tokens)
    compile_s = time.perf_counter() - start
    gen.generate(prompt, new_tokens)  # untimed: CUDA graphs record on their first replays
    timings = []
    for _ in range(args.repeats if new_tokens > 1 else args.prefill_repeats):
        gen.generate(prompt, new_tokens)
        timings.append(gen.last_timing)
    graphs = gen.compilations
    row = {"compile_s": compile_s, "prefill_graphs": graphs["prefill"], "decode_graphs": graphs["decode"],
           "recompiles": sum(max(0, n - 1) for n in graphs.values()), **counters_snapshot()}
    rates = [t.decode_tokens_per_s if new_tokens > 1 else t.prefill_tokens_per_s for t in timings]
    rate = statistics.median(rates)
    row.update({"tok_per_s": rate, "spread": (max(rates) - min(rates)) / rate})
    if new_tokens > 1:
        row["ms_per_step"] = 1e3 * prompt.shape[0] / rate
        if args.breakdown and prompt.device.type == "cuda":
            row["breakdown"] = decode_breakdown(gen, prompt)
        if gen.plan is not None:  # last: it attaches the plan again, which ends the generator's graphs
            row["decoded_ratio"] = decoded_ratio(model, gen.plan, sequences, prompt.shape[1])
            attach(model, gen.plan)
    else:
        row["ms"] = 1e3 * statistics.median(t.prefill_seconds for t in timings)
        row["launch_ms"] = 1e3 * statistics.median(t.prefill_launch_seconds for t in timings)
        if args.breakdown and prompt.device.type == "cuda":
            row["breakdown"] = prefill_breakdown(gen, prompt)
            row["gpu_ms"] = row["breakdown"]["gpu_us"] / 1e3
    del gen
    if prompt.device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def run_variants(model, plans: dict, windows: dict[str, torch.Tensor], args) -> list[dict]:
    """Decode at every batch and prefill at batch 1, dense first, then every plan; speedups over dense."""
    device = next(model.parameters()).device
    held_out = windows["held_out"].to(device)
    cache_lens = args.max_cache_len
    cases = [("decode", b, held_out[:b, :args.prompt_len], args.steps + 1, n) for n in cache_lens
             for b in args.batches if args.steps]
    if args.prefill_len:
        cases += [(f"prefill {mode}" if mode != "default" else "prefill", 1, held_out[:1, :args.prefill_len], 1,
                   prefill_cache_len(args.prefill_len)) for mode in args.prefill_modes]
    rows, dense = [], {}
    for variant in ["dense", *plans]:
        with attached(model, plans.get(variant)):
            for phase, batch, prompt, new_tokens, cache_len in cases:
                mode = phase.removeprefix("prefill ") if phase.startswith("prefill ") else None
                row = {"variant": variant, "phase": phase, "batch": batch, "tokens": prompt.shape[1],
                       "cache_len": cache_len, **time_generation(model, prompt, new_tokens, cache_len, args, mode)}
                if variant == "dense":
                    dense[(phase, batch, cache_len)] = row["tok_per_s"]
                row["speedup"] = row["tok_per_s"] / dense[(phase, batch, cache_len)]
                rows.append(row)
                print(row, flush=True)
    return rows


@contextlib.contextmanager
def attached(model, plan):
    """The model with ``plan`` attached inside the block (none: dense)."""
    detach(model)
    if plan is not None:
        attach(model, plan)
    try:
        yield
    finally:
        detach(model)


# ------------------------------------------------------------------------------------------ main
def environment(device: torch.device) -> dict:
    if device.type == "cuda":
        return env_info()
    import transformers

    return {"card": f"cpu ({platform.machine()})", "torch": torch.__version__,
            "transformers": transformers.__version__, "command": " ".join(sys.argv)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="llama2-7b")
    ap.add_argument("--layers", type=int, default=0, help="decoder layers (0: the model's own)")
    ap.add_argument("--windows", type=int, default=128, help="calibration windows")
    ap.add_argument("--window-len", type=int, default=512, help="tokens per calibration window")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.56, 0.7])
    ap.add_argument("--no-hand", action="store_true", help="leave out bench_decode.py's hand-built plan")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--steps", type=int, default=64, help="decode steps timed per call (0: no decode rows)")
    ap.add_argument("--prompt-len", type=int, default=128, help="prompt tokens before the decode steps")
    ap.add_argument("--prefill-len", type=int, default=512, help="prefill tokens timed (0: no prefill row)")
    ap.add_argument("--max-cache-len", type=int, nargs="+", default=[256],
                    help="KV cache room of the decode generators (several: decode timed at each); the default "
                         "fits the request, as Hugging Face's generate sizes its static cache")
    ap.add_argument("--breakdown", action="store_true", help="GPU time per decode step by kernel (torch.profiler)")
    ap.add_argument("--repeats", type=int, default=3, help="timed decode calls (median)")
    ap.add_argument("--prefill-repeats", type=int, default=10, help="timed prefill calls (median)")
    ap.add_argument("--prefill-modes", nargs="+", default=["default"], choices=("default", "reduce-overhead"),
                    help="torch.compile modes of the prefill to time (CompiledGenerator's prefill_mode)")
    ap.add_argument("--compiler", choices=("inductor", "aot_eager"), default="inductor",
                    help="aot_eager: check the script quickly on a CPU (no Inductor)")
    ap.add_argument("--inputs", help="folder for the tokenizer and token windows: written if missing, else read")
    ap.add_argument("--prepare-only", action="store_true", help="write --inputs and stop")
    ap.add_argument("--out", default="bench_out")
    args = ap.parse_args(argv)
    if args.prompt_len + args.steps + 1 > min(args.max_cache_len):
        raise SystemExit("--max-cache-len must hold --prompt-len + --steps + 1 tokens")
    tokenizer, windows = load_inputs(args)
    if args.prepare_only:
        return {}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = dataclasses.replace(MODELS[args.model], vocab=len(tokenizer))
    layers = args.layers or shape.layers
    model = build_model(shape, layers, dtype, str(device))
    print(f"{shape.name} x{layers} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, "
          f"{dtype}) on {device}", flush=True)
    plans, plan_rows = make_plans(model, shape, windows, args)
    res = {"env": environment(device), "args": vars(args), "model": shape.name, "layers": layers,
           "plans": plan_rows, "runs": run_variants(model, plans, windows, args)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "pipeline.md").write_text(report(res))
    print(report(res))
    return res


def report(res: dict) -> str:
    e = res["env"]
    head = (f"{res['model']} x{res['layers']}; card {e['card']}, torch {e['torch']}, transformers "
            f"{e.get('transformers')}, {e.get('date', '')}; command `{e['command']}`")
    plan_cols = ["plan", "profile_seconds", "profile_peak_gib", "calibration", "plan_seconds", "expected_ratio",
                 "held_out_ratio", "units_adapted", "units"]
    run_cols = ["variant", "phase", "batch", "tokens", "cache_len", "tok_per_s", "speedup", "ms_per_step", "ms",
                "launch_ms", "gpu_ms",
                "decoded_ratio", "compile_s",
                "prefill_graphs", "decode_graphs", "recompiles", "cudagraph_skips", "graph_breaks", "spread"]
    parts = [head, "", markdown_table(res["plans"], plan_cols), "", markdown_table(_finite(res["runs"]), run_cols)]
    for row in res["plans"]:
        if "mix" in row:
            mix = [{"projection": proj, "kind": kind, **entry} for proj, kinds in row["mix"].items()
                   for kind, entry in kinds.items()]
            parts += ["", f"### kind/rank mix: {row['plan']}",
                      markdown_table(mix, ["projection", "kind", "units", "rank_fraction", "kept_of_rank",
                                           "kept_of_inputs"])]
    return "\n".join(parts) + "\n"


def _finite(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not (isinstance(v, float) and math.isnan(v))} for r in rows]


if __name__ == "__main__":
    main()
