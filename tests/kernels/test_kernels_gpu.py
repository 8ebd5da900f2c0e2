"""The adapter ops on the GPU against float64 math, and inside torch.compile (``pytest -m gpu``).

Every op at the Llama-2-7B / Llama-3-8B unit shapes and at odd shapes, bf16/fp16/fp32, 1-8 tokens
(decode kernels; the row-skipping union kernels too) and 77/512 (masked GEMMs), kept densities 0-100%,
with the allocator poisoned (NaN) before each call so an unwritten output element shows; equal bits
on a second call; ``rank_adapter_pair`` likewise; and the ops compiled under ``mode="reduce-overhead"``
(no cudagraph skip) and with dynamic prefill shapes, equal to eager. The adapters under test are built
by benchmarks/built_adapter.py, which the timing script (benchmarks/bench_kernels.py) shares.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ranapass.kernels.capabilities import has_cuda

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not has_cuda(), reason="needs a CUDA GPU (run with pytest -m gpu)")]

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from built_adapter import TOL, BuiltAdapter, clear_of, pair_op  # noqa: E402
from common import LLAMA2_7B, LLAMA3_8B, UnitShape, block_units, poison_allocator, rel_err  # noqa: E402

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
ODD = [UnitShape("rank-odd", "rank", 1000, 777, 333), UnitShape("neuron-odd", "neuron", 999, 515),
       UnitShape("gated-odd", "neuron", 1001, 333, gated=True)]
SHAPES = [(m.name, u) for m in (LLAMA2_7B, LLAMA3_8B) for u in block_units(m) if u.name != "up"]
SHAPES += [("odd", u) for u in ODD]
CASES = {torch.bfloat16: [(T, d) for T in (1, 2, 4, 8, 77, 512) for d in (0.0, 0.3, 0.67, 1.0)],
         torch.float16: [(T, d) for T in (1, 8, 77) for d in (0.0, 0.5, 1.0)]}
CASES[torch.float32] = CASES[torch.float16]


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(0)


def _calibrated(adapter: BuiltAdapter, inp, density: float, gen: torch.Generator) -> None:
    """Thresholds keeping about ``density``, clear of every score of ``inp`` (no decision can flip)."""
    adapter.calibrate(density, gen)
    adapter.thr = clear_of(adapter.thr, adapter.scores(inp))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("model, shape", SHAPES, ids=lambda v: getattr(v, "name", v))
def test_op_equals_float64_math(model, shape, dtype, gen):
    adapter = BuiltAdapter(shape, dtype, gen)
    failures = []
    for with_bias in ((False, True) if model == "odd" else (False,)):
        adapter.bias = torch.randn(shape.m, device="cuda", generator=gen).to(dtype) if with_bias else None
        for T, d in CASES[dtype]:
            inp = adapter.inputs(T, gen)
            _calibrated(adapter, inp, d, gen)
            ref = adapter.reference(inp)
            poison_allocator()
            y = adapter.op(inp)
            torch.cuda.synchronize()
            errs = {"op": rel_err(y, ref)}
            ok = y.shape == (T, shape.m) and y.dtype == dtype
            if T <= 8 and 0 < d < 1:  # same input, same bits (fixed-order sums, no atomics on results)
                ok = ok and torch.equal(y, adapter.op(inp))
            if 1 < T <= 8:  # the union kernels too (the op runs masked GEMMs for several tokens)
                poison_allocator()
                errs["union"] = rel_err(adapter.union(inp), ref)
            if not ok or max(errs.values()) > TOL[dtype]:
                failures.append({"T": T, "density": d, "bias": with_bias, "shape_ok": ok, **errs})
    assert not failures, failures[:10]


PAIRS = [(m.name, u, u) for m in (LLAMA2_7B, LLAMA3_8B) for u in block_units(m) if u.name == "gate"]
PAIRS.append(("odd", ODD[0], UnitShape("rank-odd2", "rank", 1000, 515, 97)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("model, first, second", PAIRS, ids=lambda v: getattr(v, "name", v))
def test_rank_adapter_pair_equals_float64_math(model, first, second, dtype, gen):
    a, b = BuiltAdapter(first, dtype, gen), BuiltAdapter(second, dtype, gen)
    failures = []
    for with_bias in ((False, True) if model == "odd" else (False,)):
        for adapter in (a, b):
            adapter.bias = torch.randn(adapter.u.m, device="cuda", generator=gen).to(dtype) if with_bias else None
        for T in (1, 8, 77):
            for d in (0.0, 0.67, 1.0):
                x = a.inputs(T, gen)
                for adapter in (a, b):
                    _calibrated(adapter, x, d, gen)
                poison_allocator()
                ys = pair_op(a, b, x[0])
                torch.cuda.synchronize()
                err = max(rel_err(y, adapter.reference(x)) for y, adapter in zip(ys, (a, b)))
                ok = all(y.shape == (T, adapter.u.m) and y.dtype == dtype for y, adapter in zip(ys, (a, b)))
                ok = ok and all(torch.equal(y, z) for y, z in zip(ys, pair_op(a, b, x[0])))
                if not ok or err > TOL[dtype]:
                    failures.append({"T": T, "density": d, "bias": with_bias, "shape_and_bits_ok": ok, "err": err})
    assert not failures, failures[:10]


def _block(gen: torch.Generator):
    """A toy decoder step on the four ops (q/k/v, o, gate + up pair, gated down), bf16."""
    dtype = torch.bfloat16
    qkv, o, down = (BuiltAdapter(u, dtype, gen) for u in (UnitShape("qkv", "rank", 512, 768, 256),
                                                          UnitShape("o", "neuron", 512, 512),
                                                          UnitShape("down", "neuron", 1024, 512, gated=True)))
    gate, up = (BuiltAdapter(UnitShape(name, "rank", 512, 1024, 256), dtype, gen) for name in ("gate", "up"))
    for adapter, d in ((qkv, 0.6), (o, 0.5), (down, 0.5), (gate, 0.5), (up, 0.5)):
        adapter.calibrate(d, gen)

    def step(x):
        a = qkv.op((x,))
        b = o.op((a[..., :512],))
        g, u = pair_op(gate, up, b)
        return down.op((g, u)) + b

    return step


def test_compiled_decode_under_cuda_graphs_and_dynamic_prefill_equal_eager(gen):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    step = _block(gen)
    x1 = torch.randn(1, 1, 512, device="cuda", generator=gen).to(torch.bfloat16)
    eager = step(x1)
    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        torch.compiler.cudagraph_mark_step_begin()
        y = compiled(x1)
    assert rel_err(y.clone(), eager) < 1e-2
    assert int(counters["inductor"].get("cudagraph_skips", 0)) == 0
    dynamic = torch.compile(step, dynamic=True, fullgraph=True)
    for T in (37, 100, 300):
        xp = torch.randn(1, T, 512, device="cuda", generator=gen).to(torch.bfloat16)
        assert rel_err(dynamic(xp), step(xp)) < 1e-2


def test_compiled_decode_with_inductor_pdl_calls_the_opaque_decode_ops(gen):
    from torch._dynamo.utils import counters
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    from ranapass.kernels.launch import pdl_supported

    if not pdl_supported(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs sm_90+ (and RANAPASS_PDL not 0)")
    torch._dynamo.reset()
    counters.clear()
    step = _block(gen)
    x1 = torch.randn(1, 1, 512, device="cuda", generator=gen).to(torch.bfloat16)
    eager = step(x1)
    with inductor_config.patch({"triton.enable_pdl": True}):
        compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
        _, code = run_and_get_code(compiled, x1)
        for _ in range(3):
            torch.compiler.cudagraph_mark_step_begin()
            y = compiled(x1)
    calls = sum("".join(code).count(f"ranapass.{op}_decode.default(")
                for op in ("rank_adapter", "rank_adapter_pair", "neuron_adapter", "gated_neuron_adapter"))
    assert calls == 4
    assert rel_err(y.clone(), eager) < 1e-2
    assert int(counters["inductor"].get("cudagraph_skips", 0)) == 0
