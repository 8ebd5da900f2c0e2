"""Time the adapter kernels on the GPU against dense F.linear.

Their correctness on the GPU is checked by the tests marked ``gpu`` (``pytest -m gpu tests/kernels``):
every op at the Llama-2-7B / Llama-3-8B unit shapes and odd shapes against float64 math, and inside
torch.compile. One run here does, in order:

1. copy bandwidth (2 GiB device-to-device, read + write), at the start and at the end;
2. optionally (``--tune``) a sweep of one-token tile configs at the Llama-2-7B / Llama-3-8B unit shapes (bf16, the
   plan's kept fraction), each checked against float64 math, the fastest installed in ``configs.TUNED`` for the
   steps below and written to ``tuned.json`` (``bench_decode.py --tuned`` loads it);
3. decode timing, bf16, batch 1/2/4/8: dense ``F.linear`` vs the adapted op at each unit shape of the
   budget-0.56 plan sizing (rank ``nB = hidden/2``), over kept densities; % of copy bandwidth on the
   bytes each call must read (weights kept by the union of the batch's masks, B in full, inputs); at
   batch 1 and the plan density also the opaque ``*_decode`` op (what a compiled graph calls with Inductor's
   PDL on), the op without programmatic dependent launch (``RANAPASS_PDL=0``) and, for the neuron ops,
   the op without its persistent tickets (a fill launch per call);
4. gate + up at batch 1: two ops against one ``rank_adapter_pair``; per-kernel device time of each op;
5. prefill timing (512 and 2048 tokens), bf16, dense vs adapted;
6. the read floor (read_floor.py): at each decode op's byte count (batch 1, plan density), the time of a
   kernel that only streams those bytes, timed the same way: what latency leaves of the bar to any one launch;
   for a rank op also two dependent streams split where its router and masked GEMV split.

Usage::

    python benchmarks/bench_kernels.py [--tune] [--quick] [--out DIR]

Writes ``kernels.json``, ``kernels.md`` (and ``tuned.json``) under ``--out`` (default ``$OUT`` or ``bench_out``) and
prints a short table last.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from built_adapter import OPS, TOL, BuiltAdapter, clear_of, copies, pair_op  # noqa: E402
from common import (  # noqa: E402
    LLAMA2_7B,
    LLAMA3_8B,
    UnitShape,
    block_units,
    copy_bandwidth,
    env_info,
    kept_fraction_for_budget,
    markdown_table,
    pdl_off,
    rel_err,
    save_tuned,
    time_graph,
)
from ranapass.kernels import configs as C  # noqa: E402
from read_floor import read_floor  # noqa: E402

DENSITIES = [0.0, 0.25, 0.5, None, 1.0]  # None: the budget-0.56 kept fraction
BATCHES = [1, 2, 4, 8]


# ------------------------------------------------------------------------------------------ inputs
def pair_timing(gen: torch.Generator, bw: float, models) -> list[dict]:
    """Gate and up at batch 1 and the plan density: two ``rank_adapter`` ops against one ``rank_adapter_pair``."""
    rows = []
    for model in models:
        units = block_units(model)
        f = kept_fraction_for_budget(units, 0.56)
        gate = next(u for u in units if u.name == "gate")
        gs, us = copies(gate, torch.bfloat16, gen, f), copies(gate, torch.bfloat16, gen, f)
        inps = [g.inputs(1, gen) for g in gs]
        need = sum(g.must_read(i) + u.must_read(i) for g, u, i in zip(gs, us, inps)) / len(gs)
        floor_us = need / (bw * 1e9) * 1e6
        two = time_graph([lambda g=g, u=u, i=i: (g.op(i), u.op(i)) for g, u, i in zip(gs, us, inps)])
        one = time_graph([lambda g=g, u=u, i=i: pair_op(g, u, i[0]) for g, u, i in zip(gs, us, inps)])
        dense = time_graph([lambda g=g, u=u, i=i: (g.dense(i), u.dense(i)) for g, u, i in zip(gs, us, inps)])
        one_dec = time_graph([lambda g=g, u=u, i=i: pair_op(g, u, i[0], OPS.rank_adapter_pair_decode)
                              for g, u, i in zip(gs, us, inps)])
        with pdl_off():
            one_off = time_graph([lambda g=g, u=u, i=i: pair_op(g, u, i[0]) for g, u, i in zip(gs, us, inps)])
        for kind, t in (("dense gate + up", dense), ("two rank_adapter ops", two), ("rank_adapter_pair", one),
                        ("rank_adapter_pair_decode", one_dec), ("rank_adapter_pair (no PDL)", one_off)):
            rows.append({"model": model.name, "unit": "gate+up", "kernel": kind, "us": t, "x_dense": dense / t,
                         "floor_us": floor_us, "bound_ratio": t / floor_us if kind != "dense gate + up" else math.nan})
        del gs, us
        torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------ timing
def time_units(units: list[BuiltAdapter], T: int, gen, fn) -> tuple[float, list]:
    inps = [u.inputs(T, gen) for u in units]
    return time_graph([lambda u=u, i=i: fn(u, i) for u, i in zip(units, inps)]), inps


# (block_k, block_n, warps): one-warp 64-column tiles of several heights, which put more or fewer weight rows in
# flight per program, and two-warp tiles; wide 4-warp tiles are not tried (benchmarks/RESULTS.md says why)
GEMV_TILES = [(32, 64, 1), (64, 64, 1), (16, 64, 1), (64, 64, 2), (128, 64, 2), (32, 128, 2)]
GEMV_TARGETS = (2048, 4096, 1024)  # programs in the grid (configs.auto_splits)
ROUTER_TILES = [(512, 16, 4), (1024, 16, 4), (512, 16, 2), (256, 16, 2), (256, 32, 4)]
ROUTER_TARGETS = (528, 1056, 264)


def tune(gen: torch.Generator, bw: float, models, rows: list[dict], save=lambda: None) -> dict:
    """Time one-token tile configs per distinct unit shape at the plan's kept fraction (bf16) and install
    the fastest in ``configs.TUNED``; returns the winners as ``{key: KernelConfig}``.

    Every config's output is checked against float64 math (and, with the fused sum, for equal bits on a
    second call) before it may win. The masked GEMV is tuned with the default router, then the router
    with the winning GEMV. The first GEMV row per shape, ``gemv (split-sum baseline)``, has 64 x 128 tiles,
    2 warps and the split sum in a second launch; the next, the first of ``GEMV_TILES``. A config that fails
    to compile or launch is recorded as failed and skipped (which runs chose these: benchmarks/RESULTS.md).
    """
    best: dict[tuple, tuple[float, C.KernelConfig]] = {}
    seen = set()
    for model in models:
        units = block_units(model)
        f = kept_fraction_for_budget(units, 0.56)
        for u in units:
            key = (u.kind, u.gated, u.n, u.m, u.rank)
            if u.name == "up" or key in seen:  # up has gate's shape; Llama-3's o is Llama-2's
                continue
            seen.add(key)
            cs = copies(u, torch.bfloat16, gen, f)
            inp = cs[0].inputs(1, gen)
            cs[0].thr = clear_of(cs[0].thr, cs[0].scores(inp))
            for c in cs[1:]:
                c.thr = cs[0].thr
            ref = cs[0].reference(inp)
            need = cs[0].must_read(inp)
            K = u.rank if u.kind == "rank" else u.n
            router = C.router_config(u.n, u.rank) if u.kind == "rank" else None

            def trial(stage, tkey, gemv, r=None):
                config = (r or router, gemv) if u.kind == "rank" else gemv
                row = {"model": model.name, "unit": u.name, "T": 1, "stage": stage,
                       "config": _cfg(r if stage == "router" else gemv)}
                try:
                    y = cs[0].launch(inp, config)
                    err = rel_err(y, ref)
                    ok = err <= TOL[torch.bfloat16] and (not gemv.fused_sum or torch.equal(y, cs[0].launch(inp, config)))
                    t = _time_cfg(cs, inp, config)
                except Exception as e:  # e.g. out of registers or shared memory at this tile
                    rows.append({**row, "us": float("nan"), "pct_bw": float("nan"), "rel_err": float("nan"),
                                 "ok": False, "error": f"{type(e).__name__}: {str(e)[:200]}"})
                    return
                rows.append({**row, "us": t, "pct_bw": need / (t * 1e-6) / (bw * 1e9) * 100, "rel_err": err, "ok": ok})
                if ok and tkey is not None and (tkey not in best or t < best[tkey][0]):
                    best[tkey] = (t, r if stage == "router" else gemv)

            gkey = ("gemv", K, u.m)
            base = C.KernelConfig(64, 128, C.auto_splits(math.ceil(u.m / 128), K, 64), 2, fused_sum=False)
            trial("gemv (split-sum baseline)", None, base)
            for bk, bn, w in GEMV_TILES:
                for target in GEMV_TARGETS:
                    s = C.auto_splits(math.ceil(u.m / bn), K, bk, target)
                    trial("gemv", gkey, C.KernelConfig(bk, bn, s, w))
                    # the prefetch can pay where a split has several chunks; not in the rank prologue, whose
                    # prefetch takes too many registers (configs.masked_gemv_config)
                    if u.kind != "rank" and math.ceil(K / bk) >= 2 * s:
                        trial("gemv", gkey, C.KernelConfig(bk, bn, s, w, prefetch=True))
            if gkey in best:
                C.TUNED[gkey] = best[gkey][1]
            rkey = ("router", u.n, u.rank)
            if router is not None and rkey not in C.TUNED:  # one router shape serves qkv and gate
                for bk, bn, w in ROUTER_TILES:
                    for target in ROUTER_TARGETS:
                        r = C.KernelConfig(bk, bn, C.auto_splits(math.ceil(u.rank / bn), u.n, bk, target), w)
                        trial("router", rkey, C.masked_gemv_config(K, u.m, rank=True), r)
                if rkey in best:
                    C.TUNED[rkey] = best[rkey][1]
            del cs
            torch.cuda.empty_cache()
            save()
    return {k: v[1] for k, v in best.items()}


def profile_breakdown(gen: torch.Generator, bw: float) -> list[dict]:
    """Per-kernel device time of each op at batch 1 and the plan's kept fraction (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    rows = []
    for model in (LLAMA2_7B, LLAMA3_8B):
        units = block_units(model)
        f = kept_fraction_for_budget(units, 0.56)
        for u in units:
            if u.name == "up":
                continue
            cs = copies(u, torch.bfloat16, gen, f)
            inps = [c.inputs(1, gen) for c in cs]
            for c, i in zip(cs, inps):
                c.op(i)
            torch.cuda.synchronize()
            reps = 24
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for k in range(reps):
                    cs[k % len(cs)].op(inps[k % len(cs)])
                torch.cuda.synchronize()
            per = {}
            for e in prof.key_averages():
                if e.device_type.name == "CUDA" and e.count:
                    per[e.key] = per.get(e.key, 0.0) + e.self_device_time_total / reps
            need = cs[0].must_read(inps[0])
            row = {"model": model.name, "unit": u.name, "floor_us": need / (bw * 1e9) * 1e6}
            row.update({k.split("(")[0][:40]: v for k, v in sorted(per.items(), key=lambda kv: -kv[1])[:4]})
            rows.append(row)
            del cs
            torch.cuda.empty_cache()
    return rows


def _time_cfg(cs: list[BuiltAdapter], inp, config) -> float:
    return time_graph([lambda u=u: u.launch(inp, config) for u in cs], min_calls=64, reps=7)


def _cfg(c: C.KernelConfig) -> str:
    flags = ("" if c.fused_sum else " split-sum") + (" prefetch" if c.prefetch else "")
    return f"k{c.block_k} n{c.block_n} s{c.splits} w{c.num_warps}{flags}"


def decode_timing(gen: torch.Generator, bw: float, batches: list[int], models) -> list[dict]:
    rows = []
    for model in models:
        units = block_units(model)
        plan_f = kept_fraction_for_budget(units, 0.56)
        for u in units:
            if u.name == "up":  # the same shape as gate
                continue
            for T in batches:
                cs = copies(u, torch.bfloat16, gen, 1.0)
                t_dense, _ = time_units(cs, T, gen, BuiltAdapter.dense)
                dense_bytes = u.m * u.n * 2
                rows.append({"model": model.name, "unit": u.name, "shape": f"{u.m}x{u.n}", "T": T, "kernel": "dense",
                             "density": 1.0, "union": 1.0, "us": t_dense, "x_dense": 1.0,
                             "pct_bw": dense_bytes / (t_dense * 1e-6) / (bw * 1e9) * 100, "bound_ratio": math.nan})
                for d in DENSITIES:
                    dens = plan_f if d is None else d
                    cs[0].calibrate(dens, gen)
                    for c in cs[1:]:
                        c.thr = cs[0].thr
                    t, inps = time_units(cs, T, gen, BuiltAdapter.op)
                    need = sum(c.must_read(i) for c, i in zip(cs, inps)) / len(cs)
                    kept, union = zip(*(c.kept_rows(i) for c, i in zip(cs, inps)))
                    K = u.rank if u.kind == "rank" else u.n
                    floor_us = need / (bw * 1e9) * 1e6
                    kind = "rank" if u.kind == "rank" else ("gated" if u.gated else "neuron")
                    common = {"model": model.name, "unit": u.name, "shape": _shape(u), "T": T,
                              "density": sum(kept) / len(kept), "union": sum(union) / len(union) / K,
                              "plan": d is None}
                    rows.append({**common, "kernel": kind if T == 1 else f"{kind} (GEMM)", "us": t,
                                 "x_dense": t_dense / t, "pct_bw": floor_us / t * 100, "bound_ratio": t / floor_us})
                    if T == 1 and d is None:  # the decode op of compiled graphs; the op without PDL
                        variants = [("decode op", time_graph([lambda c=c, i=i: c.op(i, decode=True)
                                                              for c, i in zip(cs, inps)]))]
                        with pdl_off():
                            variants.append(("no PDL", time_graph([lambda c=c, i=i: c.op(i)
                                                                   for c, i in zip(cs, inps)])))
                        if u.kind == "neuron":  # without its persistent tickets: a fill launch per call
                            with _fill_per_call(cs):
                                variants.append(("ticket fill", time_graph([lambda c=c, i=i: c.op(i)
                                                                            for c, i in zip(cs, inps)])))
                        for label, tx in variants:
                            rows.append({**common, "kernel": f"{kind} ({label})", "us": tx, "x_dense": t_dense / tx,
                                         "pct_bw": floor_us / tx * 100, "bound_ratio": tx / floor_us})
                    if T > 1:  # the row-skipping union kernels at the same inputs
                        tu = time_graph([lambda c=c, i=i: c.union(i) for c, i in zip(cs, inps)])
                        rows.append({**common, "kernel": f"{kind} (union)", "us": tu, "x_dense": t_dense / tu,
                                     "pct_bw": floor_us / tu * 100, "bound_ratio": tu / floor_us})
                del cs
                torch.cuda.empty_cache()
    return rows


@contextlib.contextmanager
def _fill_per_call(units: list[BuiltAdapter]):
    """The neuron units' ops without their persistent tickets inside the block (each call fills its own)."""
    kept = [u.tickets for u in units]
    for u in units:
        u.tickets = None
    try:
        yield
    finally:
        for u, t in zip(units, kept):
            u.tickets = t


def _shape(u: UnitShape) -> str:
    return f"B {u.rank}x{u.n}, At {u.rank}x{u.m}" if u.kind == "rank" else f"Wt {u.n}x{u.m}"


def prefill_timing(gen: torch.Generator, tokens=(512, 2048)) -> list[dict]:
    rows = []
    for model in (LLAMA2_7B, LLAMA3_8B):
        units = block_units(model)
        f = kept_fraction_for_budget(units, 0.56)
        for u in units:
            if u.name == "up":
                continue
            cs = [BuiltAdapter(u, torch.bfloat16, gen) for _ in range(2)]
            cs[0].calibrate(f, gen)
            cs[1].thr = cs[0].thr
            for T in tokens:
                td, _ = time_units(cs, T, gen, BuiltAdapter.dense)
                ta, _ = time_units(cs, T, gen, BuiltAdapter.op)
                rows.append({"model": model.name, "unit": u.name, "T": T, "dense_us": td, "adapted_us": ta,
                             "x_dense": td / ta, "dense_flops_tflops": 2 * T * u.m * u.n / td / 1e6})
            del cs
            torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tune", action="store_true",
                    help="first time one-token tile configs at the Llama-2-7B and Llama-3-8B shapes and use the "
                         "fastest (a few minutes); writes tuned.json for bench_decode.py --tuned")
    ap.add_argument("--quick", action="store_true", help="batch 1 and 8 only")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    res = {"env": env_info()}
    t0 = time.time()
    res["copy_gbps_start"] = bw = copy_bandwidth()
    print(f"copy bandwidth {bw:.0f} GB/s", flush=True)

    if args.tune:
        res["tune"] = []
        winners = tune(gen, bw, (LLAMA2_7B, LLAMA3_8B), res["tune"], save=lambda: _save(out, res))
        save_tuned(out / "tuned.json", winners)
        print(tune_summary(res["tune"]), flush=True)
        print(f"tune done ({time.time() - t0:.0f} s)", flush=True)
    batches = [1, 8] if args.quick else BATCHES
    res["decode"] = decode_timing(gen, bw, batches, (LLAMA2_7B, LLAMA3_8B))
    res["pair"] = pair_timing(gen, bw, (LLAMA2_7B, LLAMA3_8B))
    for r in res["pair"]:
        print(f"pair {r['model']} {r['kernel']}: {r['us']:.2f} us, x dense {r['x_dense']:.2f}, "
              f"t/floor {r['bound_ratio']:.2f}", flush=True)
    _save(out, res)
    res["profile"] = profile_breakdown(gen, bw)
    for r in res["profile"]:
        print("profile", r, flush=True)
    res["prefill"] = prefill_timing(gen)
    res["read_floor"] = read_floor(bw, decode_ops(res))
    _save(out, res)
    res["copy_gbps_end"] = copy_bandwidth()
    res["seconds"] = time.time() - t0
    _save(out, res)
    (out / "kernels.md").write_text(report(res))
    print(summary(res), flush=True)


def decode_ops(res: dict) -> list[dict]:
    """The ops a compiled decode graph calls at batch 1 and the plan density (``*_decode``), with their
    floors and, for a rank op, the bytes its router launch reads (B of each unit, and x; bf16)."""
    units = {(m.name, u.name): u for m in (LLAMA2_7B, LLAMA3_8B) for u in block_units(m)}
    ops = [{**r, "floor_us": r["us"] / r["bound_ratio"]} for r in res["decode"]
           if r["T"] == 1 and r.get("plan") and r["kernel"].endswith("(decode op)")]
    ops += [dict(r) for r in res["pair"] if r["kernel"] == "rank_adapter_pair_decode"]
    for op in ops:
        rank = [units[op["model"], name] for name in op["unit"].split("+")]
        if all(u.kind == "rank" for u in rank):
            op["router_bytes"] = 2 * (sum(u.rank * u.n for u in rank) + rank[0].n)
    return ops


def _save(out: Path, res: dict) -> None:
    (out / "kernels.json").write_text(json.dumps(res, indent=1, default=str))


def report(res: dict) -> str:
    e = res["env"]
    parts = [f"card {e['card']} ({e['sms']} SMs, L2 {e['l2_mib']:.0f} MiB), torch {e['torch']}, triton {e['triton']}, "
             f"CUDA {e['cuda']}, {e['date']}; command `{e['command']}`",
             f"copy bandwidth {res['copy_gbps_start']:.0f} GB/s at start, {res['copy_gbps_end']:.0f} GB/s at end",
             "", "### decode (bf16)", markdown_table(res["decode"], ["model", "unit", "shape", "T", "kernel", "density",
                                                                   "union", "us", "x_dense", "pct_bw", "bound_ratio"]),
             "", "### prefill (bf16)", markdown_table(res["prefill"], ["model", "unit", "T", "dense_us", "adapted_us",
                                                                      "x_dense", "dense_flops_tflops"]),
             "", "### gate + up at batch 1, plan density: two ops vs rank_adapter_pair (bf16)",
             markdown_table(res["pair"], ["model", "unit", "kernel", "us", "x_dense", "floor_us", "bound_ratio"]),
             ]
    if "read_floor" in res:
        parts += ["", "### read floor: a kernel that only streams each decode op's bytes (read_floor.py), t/floor",
                  markdown_table(res["read_floor"], ["model", "unit", "op", "mbytes", "floor_us", "op_us", "op_ratio",
                                                     "stream_us", "stream_ratio", "stream_cfg", "after_input_us",
                                                     "after_input_ratio", "two_streams_us", "two_streams_ratio",
                                                     "torch_sum_us", "torch_sum_ratio"])]
    if "tune" in res:
        parts += ["", "### tune: batch 1, bf16, plan density (whole op; router rows: the router config with the "
                  "tuned GEMV)", markdown_table(res["tune"], ["model", "unit", "stage", "config", "us", "pct_bw",
                                                              "rel_err", "ok"])]
    if "profile" in res:
        first = ["model", "unit", "floor_us"]
        cols = first + sorted({k for r in res["profile"] for k in r} - set(first))
        parts += ["", "### per-kernel device time, batch 1, plan density (us)", markdown_table(res["profile"], cols)]
    return "\n".join(parts) + "\n"


def tune_summary(rows: list[dict]) -> str:
    """Per unit: the split-sum baseline, the first of ``GEMV_TILES`` and the fastest checked config."""
    lines = []
    for unit in dict.fromkeys((r["model"], r["unit"]) for r in rows):
        mine = [r for r in rows if (r["model"], r["unit"]) == unit]
        baseline = next(r for r in mine if r["stage"] == "gemv (split-sum baseline)")
        first = next(r for r in mine if r["stage"] == "gemv")
        parts = [f"split-sum baseline {baseline['us']:.2f}", f"{first['config']} {first['us']:.2f}"]
        for stage in ("gemv", "router"):
            ok = [r for r in mine if r["stage"] == stage and r["ok"]]
            if ok:
                b = min(ok, key=lambda r: r["us"])
                parts.append(f"best {stage} {b['us']:.2f} ({b['config']})")
        bad = sum(not r["ok"] for r in mine)
        lines.append(f"tune {unit[0]} {unit[1]}: " + ", ".join(parts) + (f", {bad} configs FAILED checks" if bad else ""))
    return "\n".join(lines)


def summary(res: dict) -> str:
    rows = [r for r in res["decode"] if r["T"] == 1 and (r["kernel"] == "dense" or r.get("plan"))]
    w = max(len(r["kernel"]) for r in rows)
    lines = ["", f"{'model':<11} {'unit':<5} {'kernel':<{w}} {'dens':>5} {'us':>7} {'x dense':>7} {'%BW':>5} "
                 f"{'t/floor':>7}"]
    for r in rows:
        lines.append(f"{r['model']:<11} {r['unit']:<5} {r['kernel']:<{w}} {r['density']:>5.2f} {r['us']:>7.2f} "
                     f"{r['x_dense']:>7.2f} {r['pct_bw']:>5.0f} {r['bound_ratio']:>7.2f}")
    for r in res.get("read_floor", []):
        lines.append(f"read floor {r['model']:<11} {r['unit']:<7} {r['mbytes']:6.1f} MB: op {r['op_ratio']:.2f}, "
                     f"stream {r['stream_ratio']:.2f} ({r['stream_cfg']}), after input {r['after_input_ratio']:.2f}, "
                     f"two streams {r['two_streams_ratio']:.2f}, torch.sum {r['torch_sum_ratio']:.2f}")
    lines.append(f"copy {res['copy_gbps_start']:.0f}/"
                 f"{res['copy_gbps_end']:.0f} GB/s; {res['seconds']:.0f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
