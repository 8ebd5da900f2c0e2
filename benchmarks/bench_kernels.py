"""Check the adapter kernels on the GPU against a float64 reference, then time them against dense F.linear.

One run does, in order:

1. copy bandwidth (2 GiB device-to-device, read + write), at the start and at the end;
2. correctness: every op at the Llama-2-7B / Llama-3-8B unit shapes and at odd shapes, bf16/fp16/fp32,
   1-8 tokens (decode) and 77/512 (prefill), kept densities 0-100%, against float64 math, with the
   allocator poisoned (NaN) before each call so an unwritten output element shows;
3. torch.compile: the four ops in one function under ``mode="reduce-overhead"`` (cudagraph skips must
   be 0) and a dynamic-shape prefill compile, both equal to eager;
4. optionally (``--tune``) a sweep of one-token tile configs at the Llama-2-7B / Llama-3-8B unit shapes (bf16, the
   plan's kept fraction), each checked, the fastest installed in ``configs.TUNED`` for the steps below
   and written to ``tuned.json`` (``bench_decode.py --tuned`` loads it);
5. decode timing, bf16, batch 1/2/4/8: dense ``F.linear`` vs the adapted op at each unit shape of the
   budget-0.56 plan sizing (rank ``nB = hidden/2``), over kept densities; % of copy bandwidth on the
   bytes each call must read (weights kept by the union of the batch's masks, B in full, inputs); at
   batch 1 and the plan density also the opaque ``*_decode`` op (what a compiled graph calls with Inductor's
   PDL on), the op without programmatic dependent launch (``RANAPASS_PDL=0``) and, for the neuron ops,
   the op without its persistent tickets (a fill launch per call);
6. prefill timing (512 and 2048 tokens), bf16, dense vs adapted;
7. the read floor (read_floor.py): at each decode op's byte count (batch 1, plan density), the time of a
   kernel that only streams those bytes, timed the same way: what latency leaves of the bar to any one launch;
   for a rank op also two dependent streams split where its router and masked GEMV split.

Usage::

    python benchmarks/bench_kernels.py [--tune] [--quick] [--check-only] [--out DIR]

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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ranapass.kernels.ops  # noqa: E402,F401  (registers torch.ops.ranapass.*)
from common import (  # noqa: E402
    LLAMA2_7B,
    LLAMA3_8B,
    UnitShape,
    block_units,
    copies_for,
    copy_bandwidth,
    env_info,
    kept_fraction_for_budget,
    markdown_table,
    pdl_off,
    poison_allocator,
    rel_err,
    save_tuned,
    time_graph,
)
from ranapass.kernels import configs as C  # noqa: E402
from ranapass.kernels.launch import direct_launch, pdl_supported  # noqa: E402
from ranapass.kernels.neuron_adapter import gated_neuron_adapter, neuron_adapter, ticket_buffer  # noqa: E402
from ranapass.kernels.rank_adapter import rank_adapter  # noqa: E402
from read_floor import read_floor  # noqa: E402

OPS = torch.ops.ranapass
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}
MARGIN = 1e-4  # in checks, thresholds stay this far (relative) from every score (fp32 sums differ by ~1e-6)
DENSITIES = [0.0, 0.25, 0.5, None, 1.0]  # None: the budget-0.56 kept fraction
BATCHES = [1, 2, 4, 8]


# ------------------------------------------------------------------------------------------ inputs
def thresholds_for(scores: torch.Tensor, density: float) -> torch.Tensor:
    """One threshold per column keeping about ``density`` of ``scores: [N, k]`` (their |.| quantile)."""
    k = scores.shape[-1]
    if density >= 1.0:
        return torch.zeros(k, device=scores.device)
    if density <= 0.0:
        return torch.full((k,), math.inf, device=scores.device)
    return torch.quantile(scores.abs().float().flatten()[:2**24], 1.0 - density).expand(k).clone()


def clear_of(thr: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Move thresholds that sit within MARGIN of one of ``scores`` just above it, so no mask decision can
    differ between the kernel (fp32 sums) and the float64 reference."""
    mag = scores.abs().float()
    for _ in range(20):
        near = ((mag - thr).abs() <= MARGIN * torch.maximum(mag, thr)).any(0)
        if not near.any():
            break
        thr = torch.where(near, thr * (1 + 3 * MARGIN), thr)
    return thr


class Unit:
    """Random tensors of one unit (weights of the adapter and of the dense linear) and its op calls."""

    def __init__(self, u: UnitShape, dtype: torch.dtype, gen: torch.Generator):
        self.u, self.dtype = u, dtype
        dev = "cuda"
        if u.kind == "rank":
            self.B = (torch.randn(u.rank, u.n, device=dev, generator=gen) * u.n ** -0.5).to(dtype)
            self.At = (torch.randn(u.rank, u.m, device=dev, generator=gen) * u.rank ** -0.5).to(dtype)
        else:
            self.Wt = (torch.randn(u.n, u.m, device=dev, generator=gen) * u.n ** -0.5).to(dtype)
            # kept across calls, as a bound adapter keeps it; a static input under CUDA graphs, as the
            # backend's registered buffers are
            self.tickets = ticket_buffer(u.m, dev)
            torch._dynamo.mark_static_address(self.tickets)
        self.W = (torch.randn(u.m, u.n, device=dev, generator=gen) * u.n ** -0.5).to(dtype)  # dense twin
        self.bias = None
        self.thr = None

    def inputs(self, T: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        """Fresh random input(s) for T tokens: x, or (gate, up) for a gated unit."""
        if self.u.gated:
            return (torch.randn(T, self.u.n, device="cuda", generator=gen).mul_(2).to(self.dtype),
                    torch.randn(T, self.u.n, device="cuda", generator=gen).to(self.dtype))
        return (torch.randn(T, self.u.n, device="cuda", generator=gen).to(self.dtype),)

    def scores(self, inp: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """What the mask thresholds, in float64: z = B x, x, or act(gate)*up (rounded like torch)."""
        if self.u.kind == "rank":
            return inp[0].double() @ self.B.double().t()
        if self.u.gated:
            return (F.silu(inp[0]) * inp[1]).double()
        return inp[0].double()

    def calibrate(self, density: float, gen: torch.Generator) -> None:
        self.thr = thresholds_for(self.scores(self.inputs(256, gen)), density)

    def op(self, inp: tuple[torch.Tensor, ...], decode: bool = False) -> torch.Tensor:
        """The op, or with ``decode`` its opaque ``*_decode`` op (what a compiled graph calls under CUDA
        graphs with Inductor's PDL on, ops.py)."""
        suffix = "_decode" if decode else ""
        if self.u.kind == "rank":
            return getattr(OPS, "rank_adapter" + suffix)(inp[0], self.B, self.At, self.thr, self.bias)
        if self.u.gated:
            return getattr(OPS, "gated_neuron_adapter" + suffix)(inp[0], inp[1], self.Wt, self.thr, self.bias,
                                                                  self.tickets, "silu")
        return getattr(OPS, "neuron_adapter" + suffix)(inp[0], self.Wt, self.thr, self.bias, self.tickets)

    def launch(self, inp, config) -> torch.Tensor:
        """The launcher with an explicit tile config (sweeps)."""
        with direct_launch():
            if self.u.kind == "rank":
                return rank_adapter(inp[0], self.B, self.At, self.thr, self.bias, config=config)
            if self.u.gated:
                return gated_neuron_adapter(inp[0], inp[1], self.Wt, self.thr, self.bias, "silu", config=config,
                                            tickets=self.tickets)
            return neuron_adapter(inp[0], self.Wt, self.thr, self.bias, config=config, tickets=self.tickets)

    def union_config(self, T: int):
        """The explicit decode config that makes the launcher run the union kernels for T tokens."""
        if self.u.kind == "rank":
            return C.rank_adapter_configs(self.u.n, self.u.rank, self.u.m, T)
        return C.masked_gemv_config(self.u.n, self.u.m, T)

    def union(self, inp: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The row-skipping union kernels for several tokens (the op takes masked GEMMs there)."""
        return self.launch(inp, self.union_config(inp[0].shape[0]))

    def dense(self, inp: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Plain ``F.linear`` of the same shape (for a gated unit without its SiLU·mul, which the op pays)."""
        return F.linear(inp[0], self.W)

    def reference(self, inp: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """float64 reference of the op (the mask from float64 scores; thresholds keep clear of them)."""
        s = self.scores(inp)
        v = torch.where(s.abs() >= self.thr.double(), s, 0.0)
        y = v @ (self.At if self.u.kind == "rank" else self.Wt).double()
        return y + self.bias.double() if self.bias is not None else y

    def kept_rows(self, inp: tuple[torch.Tensor, ...]) -> tuple[float, int]:
        """(mean kept fraction per token, rows kept by the union of the tokens)."""
        s = self.scores(inp)
        keep = (s.abs() >= self.thr.double()) & (s != 0)
        return keep.float().mean().item(), int(keep.any(0).sum().item())

    def weight_bytes(self) -> int:
        es = torch.finfo(self.dtype).bits // 8
        return (self.u.rank * (self.u.n + self.u.m) if self.u.kind == "rank" else self.u.n * self.u.m) * es

    def must_read(self, inp: tuple[torch.Tensor, ...]) -> int:
        """Bytes a call must read: B in full, the kept rows of At/Wt (union), inputs, thresholds."""
        es = torch.finfo(self.dtype).bits // 8
        _, rows = self.kept_rows(inp)
        T = inp[0].shape[0]
        if self.u.kind == "rank":
            return (self.u.rank * self.u.n + rows * self.u.m + T * self.u.n) * es + 4 * self.u.rank
        return (rows * self.u.m + len(inp) * T * self.u.n) * es + 4 * self.u.n


def copies(u: UnitShape, dtype, gen, density) -> list[Unit]:
    first = Unit(u, dtype, gen)
    first.calibrate(density, gen)
    units = [first]
    for _ in range(copies_for(first.weight_bytes()) - 1):
        c = Unit(u, dtype, gen)
        c.thr = first.thr
        units.append(c)
    return units


# ------------------------------------------------------------------------------------------ checks
def check(gen: torch.Generator, quick: bool) -> list[dict]:
    rows = []
    shapes = [(m.name, u) for m in (LLAMA2_7B, LLAMA3_8B) for u in block_units(m) if u.name != "up"]
    shapes += [("odd", UnitShape("rank-odd", "rank", 1000, 777, 333)), ("odd", UnitShape("neuron-odd", "neuron", 999, 515)),
               ("odd", UnitShape("gated-odd", "neuron", 1001, 333, gated=True))]
    cases = [(torch.bfloat16, T, d) for T in (1, 2, 4, 8, 77, 512) for d in (0.0, 0.3, 0.67, 1.0)]
    cases += [(dt, T, d) for dt in (torch.float16, torch.float32) for T in (1, 8, 77) for d in (0.0, 0.5, 1.0)]
    if quick:
        cases = [c for c in cases if c[1] in (1, 8, 77) and c[2] in (0.0, 0.67, 1.0, 0.5)]
    for model, u in shapes:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            unit = Unit(u, dtype, gen)
            for with_bias in ((False, True) if model == "odd" else (False,)):
                unit.bias = torch.randn(u.m, device="cuda", generator=gen).to(dtype) if with_bias else None
                for dt, T, d in cases:
                    if dt != dtype:
                        continue
                    unit.calibrate(d, gen)
                    inp = unit.inputs(T, gen)
                    unit.thr = clear_of(unit.thr, unit.scores(inp))
                    poison_allocator()
                    y = unit.op(inp)
                    torch.cuda.synchronize()
                    err = rel_err(y, unit.reference(inp))
                    ok = y.shape == (T, u.m) and y.dtype == dtype and err <= TOL[dtype]
                    if T <= 8 and 0 < d < 1:  # same input, same bits (fixed-order sums, no atomics)
                        ok = ok and torch.equal(y, unit.op(inp))
                    if 1 < T <= 8:  # the union kernels too (the op runs masked GEMMs for several tokens)
                        poison_allocator()
                        yu = unit.union(inp)
                        torch.cuda.synchronize()
                        err = max(err, rel_err(yu, unit.reference(inp)))
                        ok = ok and err <= TOL[dtype]
                    rows.append({"model": model, "unit": u.name, "dtype": str(dtype).split(".")[-1], "T": T,
                                 "density": d, "bias": with_bias, "rel_err": err, "ok": ok})
            del unit
    return rows


def pair_op(first: Unit, second: Unit, x: torch.Tensor, op=OPS.rank_adapter_pair) -> tuple[torch.Tensor,
                                                                                               torch.Tensor]:
    """Two rank units on one input through ``rank_adapter_pair`` (gate and up), or its decode op."""
    return op(x, first.B, first.At, first.thr, first.bias, second.B, second.At, second.thr, second.bias)


def check_pair(gen: torch.Generator) -> list[dict]:
    """``rank_adapter_pair`` against float64 math per unit: gate/up shapes of both models and odd shapes."""
    rows = []
    shapes = [(m.name, u, u) for m in (LLAMA2_7B, LLAMA3_8B) for u in block_units(m) if u.name == "gate"]
    shapes.append(("odd", UnitShape("rank-odd", "rank", 1000, 777, 333), UnitShape("rank-odd2", "rank", 1000, 515, 97)))
    for model, u1, u2 in shapes:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            a, b = Unit(u1, dtype, gen), Unit(u2, dtype, gen)
            for with_bias in ((False, True) if model == "odd" else (False,)):
                for unit in (a, b):
                    unit.bias = torch.randn(unit.u.m, device="cuda", generator=gen).to(dtype) if with_bias else None
                for T in (1, 8, 77):
                    for d in (0.0, 0.67, 1.0):
                        x = a.inputs(T, gen)
                        for unit in (a, b):
                            unit.calibrate(d, gen)
                            unit.thr = clear_of(unit.thr, unit.scores(x))
                        poison_allocator()
                        ys = pair_op(a, b, x[0])
                        torch.cuda.synchronize()
                        err = max(rel_err(y, unit.reference(x)) for y, unit in zip(ys, (a, b)))
                        ok = all(y.shape == (T, unit.u.m) and y.dtype == dtype for y, unit in zip(ys, (a, b)))
                        ok = ok and err <= TOL[dtype] and all(torch.equal(y, z) for y, z in zip(ys, pair_op(a, b, x[0])))
                        rows.append({"model": model, "unit": "gate+up pair", "dtype": str(dtype).split(".")[-1],
                                     "T": T, "density": d, "bias": with_bias, "rel_err": err, "ok": ok})
            del a, b
    return rows


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


def check_compile(gen: torch.Generator) -> dict:
    """The ops inside torch.compile: reduce-overhead decode (no cudagraph skip) and dynamic prefill; on
    sm_90+ also reduce-overhead decode with Inductor's PDL, which must call the four opaque decode ops."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    dtype = torch.bfloat16
    qkv, o, down = (Unit(u, dtype, gen) for u in (UnitShape("qkv", "rank", 512, 768, 256),
                                                  UnitShape("o", "neuron", 512, 512),
                                                  UnitShape("down", "neuron", 1024, 512, gated=True)))
    gate, up = (Unit(UnitShape(name, "rank", 512, 1024, 256), dtype, gen) for name in ("gate", "up"))
    for unit, d in ((qkv, 0.6), (o, 0.5), (down, 0.5), (gate, 0.5), (up, 0.5)):
        unit.calibrate(d, gen)

    def step(x):
        a = qkv.op((x,))
        b = o.op((a[..., :512],))
        g, u = pair_op(gate, up, b)
        c = down.op((g, u))
        return c + b

    out = {}
    x1 = torch.randn(1, 1, 512, device="cuda", generator=gen).to(dtype)
    eager = step(x1)
    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        torch.compiler.cudagraph_mark_step_begin()
        y = compiled(x1)
    out["decode_rel_err"] = rel_err(y.clone(), eager)
    out["cudagraph_skips"] = int(counters["inductor"].get("cudagraph_skips", 0))
    dyn = torch.compile(step, dynamic=True, fullgraph=True)
    errs = []
    for T in (37, 100, 300):
        xp = torch.randn(1, T, 512, device="cuda", generator=gen).to(dtype)
        errs.append(rel_err(dyn(xp), step(xp)))
    out["prefill_rel_err"] = max(errs)
    out["unique_graphs"] = int(counters["stats"].get("unique_graphs", 0))
    out["ok"] = out["cudagraph_skips"] == 0 and out["decode_rel_err"] < 1e-2 and out["prefill_rel_err"] < 1e-2
    if pdl_supported(x1.device):  # with Inductor's PDL the decode calls become the opaque *_decode ops
        from torch._inductor import config as inductor_config
        from torch._inductor.utils import run_and_get_code

        torch._dynamo.reset()
        counters.clear()
        with inductor_config.patch({"triton.enable_pdl": True}):
            compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
            _, code = run_and_get_code(compiled, x1)
            for _ in range(3):
                torch.compiler.cudagraph_mark_step_begin()
                y = compiled(x1)
        out["pdl_decode_ops"] = sum("".join(code).count(f"ranapass.{op}_decode.default(")
                                    for op in ("rank_adapter", "rank_adapter_pair", "neuron_adapter",
                                               "gated_neuron_adapter"))
        out["pdl_decode_rel_err"] = rel_err(y.clone(), eager)
        out["pdl_cudagraph_skips"] = int(counters["inductor"].get("cudagraph_skips", 0))
        out["ok"] = (out["ok"] and out["pdl_decode_ops"] == 4 and out["pdl_cudagraph_skips"] == 0
                     and out["pdl_decode_rel_err"] < 1e-2)
    return out


# ------------------------------------------------------------------------------------------ timing
def time_units(units: list[Unit], T: int, gen, fn) -> tuple[float, list]:
    inps = [u.inputs(T, gen) for u in units]
    return time_graph([lambda u=u, i=i: fn(u, i) for u, i in zip(units, inps)]), inps


# (block_k, block_n, warps): run D's winner (32 x 64, one warp) and taller 64-column tiles, which put more
# weight rows in flight per program; run D's wide tiles (128 x 128 / 4, 64 x 256 / 4) lost at every shape
GEMV_TILES = [(32, 64, 1), (64, 64, 1), (16, 64, 1), (64, 64, 2), (128, 64, 2), (32, 128, 2)]
GEMV_TARGETS = (2048, 4096, 1024)  # programs in the grid (configs.auto_splits)
ROUTER_TILES = [(512, 16, 4), (1024, 16, 4), (512, 16, 2), (256, 16, 2), (256, 32, 4)]
ROUTER_TARGETS = (528, 1056, 264)


def tune(gen: torch.Generator, bw: float, models, rows: list[dict], save=lambda: None) -> dict:
    """Time one-token tile configs per distinct unit shape at the plan's kept fraction (bf16) and install
    the fastest in ``configs.TUNED``; returns the winners as ``{key: KernelConfig}``.

    Every config's output is checked against float64 math (and, with the fused sum, for equal bits on a
    second call) before it may win. The masked GEMV is tuned with the default router, then the router
    with the winning GEMV. The first GEMV row per shape is run C's version (64 x 128 tiles, 2 warps, split
    sum in a second launch), the second run D's tiles (32 x 64, one warp, fused sum). A config that fails
    to compile or launch is recorded as failed and skipped.
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
            trial("gemv (run C)", None, base)
            for bk, bn, w in GEMV_TILES:
                for target in GEMV_TARGETS:
                    s = C.auto_splits(math.ceil(u.m / bn), K, bk, target)
                    trial("gemv", gkey, C.KernelConfig(bk, bn, s, w))
                    # the prefetch can pay where a split has several chunks; the rank prologue's prefetch
                    # (IN_SPLITS loads a row) took 164-245 registers a thread in sm_90 compiles: not tried
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


def _time_cfg(cs: list[Unit], inp, config) -> float:
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
                t_dense, _ = time_units(cs, T, gen, Unit.dense)
                dense_bytes = u.m * u.n * 2
                rows.append({"model": model.name, "unit": u.name, "shape": f"{u.m}x{u.n}", "T": T, "kernel": "dense",
                             "density": 1.0, "union": 1.0, "us": t_dense, "x_dense": 1.0,
                             "pct_bw": dense_bytes / (t_dense * 1e-6) / (bw * 1e9) * 100, "bound_ratio": math.nan})
                for d in DENSITIES:
                    dens = plan_f if d is None else d
                    cs[0].calibrate(dens, gen)
                    for c in cs[1:]:
                        c.thr = cs[0].thr
                    t, inps = time_units(cs, T, gen, Unit.op)
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
def _fill_per_call(units: list[Unit]):
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
            cs = [Unit(u, torch.bfloat16, gen) for _ in range(2)]
            cs[0].calibrate(f, gen)
            cs[1].thr = cs[0].thr
            for T in tokens:
                td, _ = time_units(cs, T, gen, Unit.dense)
                ta, _ = time_units(cs, T, gen, Unit.op)
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
    ap.add_argument("--quick", action="store_true", help="fewer check cases, batch 1 and 8 only")
    ap.add_argument("--check-only", action="store_true", help="stop after the correctness and compile checks")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    res = {"env": env_info()}
    t0 = time.time()
    res["copy_gbps_start"] = bw = copy_bandwidth()
    print(f"copy bandwidth {bw:.0f} GB/s", flush=True)

    res["check"] = check(gen, args.quick)
    bad = [r for r in res["check"] if not r["ok"]]
    print(f"check: {len(res['check']) - len(bad)}/{len(res['check'])} ok, worst rel err by dtype: "
          + ", ".join(f"{dt} {max(r['rel_err'] for r in res['check'] if r['dtype'] == dt):.2e}"
                      for dt in ("bfloat16", "float16", "float32")), flush=True)
    for r in bad[:20]:
        print("  FAIL", r, flush=True)
    res["check"] += check_pair(gen)
    pair_rows = [r for r in res["check"] if r["unit"] == "gate+up pair"]
    print(f"check rank_adapter_pair: {sum(r['ok'] for r in pair_rows)}/{len(pair_rows)} ok", flush=True)
    for r in [r for r in pair_rows if not r["ok"]][:10]:
        print("  FAIL", r, flush=True)
    res["compile"] = check_compile(gen)
    print("compile:", res["compile"], flush=True)
    _save(out, res)
    if args.check_only:
        return

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
             "", "### compile", json.dumps(res["compile"])]
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
    """Per unit: run C's version, run D's tiles (the first GEMV config) and the fastest checked config."""
    lines = []
    for unit in dict.fromkeys((r["model"], r["unit"]) for r in rows):
        mine = [r for r in rows if (r["model"], r["unit"]) == unit]
        run_c = next(r for r in mine if r["stage"] == "gemv (run C)")
        run_d = next(r for r in mine if r["stage"] == "gemv")
        parts = [f"run C {run_c['us']:.2f}", f"run D tiles {run_d['us']:.2f}"]
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
    ok = sum(r["ok"] for r in res["check"])
    lines.append(f"check {ok}/{len(res['check'])} ok; compile {res['compile']}; copy {res['copy_gbps_start']:.0f}/"
                 f"{res['copy_gbps_end']:.0f} GB/s; {res['seconds']:.0f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
