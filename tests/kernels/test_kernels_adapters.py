"""The Triton kernels against the reference math: random odd shapes, densities 0-100%, dtypes, batches.

The kernels run where they can: on a GPU, or on CPU tensors under Triton's interpreter. Triton
decides at import time whether ``@triton.jit`` makes interpreted functions, so on a CPU-only machine
these tests skip in the main pytest process and ``test_kernels_interpreter.py`` runs this file again
in a subprocess with ``TRITON_INTERPRET=1`` set before anything is imported (the fixed cases in the
fast suite, the random properties, marked ``slow``, in the full one). The rest of the suite never sees
the interpreter.

Thresholds are kept away from every score by a margin (``_thresholds``), so a mask decision cannot
flip between the kernel's and the reference's summation order; the comparison is then the plain
relative error of the outputs, with a tolerance per dtype (for the rank adapter's masked GEMMs, plus
the one rounding of its scores that path makes: ``_rank_rtol``).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ranapass.kernels.capabilities import has_cuda, has_triton, triton_interpret

pytestmark = pytest.mark.skipif(
    not has_triton() or not (has_cuda() or triton_interpret()),
    reason="needs a GPU or TRITON_INTERPRET=1; on CPU test_kernels_interpreter.py runs this file in a subprocess")

if has_triton() and (has_cuda() or triton_interpret()):
    from ranapass.kernels.configs import KernelConfig, use_kernels
    from ranapass.kernels.launch import direct_launch
    from ranapass.kernels.neuron_adapter import gated_neuron_adapter, neuron_adapter, neuron_adapter_pair, ticket_buffer
    from ranapass.kernels.rank_adapter import rank_adapter, rank_adapter_pair
    from ranapass.kernels.reference import (
        gated_activation,
        neuron_adapter_reference,
        rank_adapter_reference,
        rank_adapter_scores,
    )

DEVICE = "cpu" if triton_interpret() else "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# relative error ||y - ref|| / ||ref||; bf16/fp16 outputs are rounded once, on top of fp32 math
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# how far (relative) thresholds stay from any score: more than one ulp of the input dtype
MARGIN = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}
EXAMPLES = 50 if triton_interpret() else 30
# unit roundoff of each dtype: the rank adapter's masked GEMMs round every kept score once (_rank_rtol)
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def _thresholds(scores: torch.Tensor, density: float, margin: float, gen: torch.Generator) -> torch.Tensor:
    """Per-column thresholds keeping about ``density`` of ``scores: [T, k]``, none within ``margin`` of a score.

    density 1 gives zeros (keep everything, ``|s| >= 0``), density 0 gives +inf.
    """
    mag = scores.abs().double()
    if density >= 1.0:
        return torch.zeros(scores.shape[-1])
    if density <= 0.0:
        return torch.full((scores.shape[-1],), float("inf"))
    q = torch.quantile(mag.flatten(), 1.0 - density).item()
    thr = q * (0.5 + torch.rand(scores.shape[-1], generator=gen, dtype=torch.float64))
    for _ in range(60):  # push thresholds out of the margin around every score
        near = ((mag - thr).abs() <= margin * torch.maximum(mag, thr)).any(0)
        if not near.any():
            break
        thr = torch.where(near, thr * (1 + 3 * margin), thr)
    return thr.float()


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(y).any(), "NaN in the kernel output"
    den = ref.double().norm().item()
    num = (y.double() - ref.double()).norm().item()
    return num / den if den > 0 else num


def _rank_rtol(x, B, At, thr, ref, T, config, dtype) -> float:
    """Relative error allowed for a rank adapter's output.

    The decode kernels keep ``z`` in fp32: RTOL. The masked GEMMs (more tokens than the kernels take,
    masked_gemm.py) multiply the masked ``z`` rounded to the weights' dtype, as cuBLAS needs one dtype,
    which moves output j by up to ``u * sum_i |z_i| |At_ij|``: far more than RTOL |y_j| when the terms
    cancel. That bound is added, in norm, for that path only.
    """
    if use_kernels(T, config):
        return RTOL[dtype]
    z, keep = rank_adapter_scores(x.cpu(), B.cpu(), thr.cpu())
    terms = torch.where(keep, z.abs(), 0.0) @ At.cpu().float().abs()
    den = ref.double().norm().item()
    return RTOL[dtype] + UNIT_ROUNDOFF[dtype] * terms.double().norm().item() / (den if den > 0 else 1.0)


def _rand(shape, dtype, gen, scale=1.0):
    return (torch.randn(shape, generator=gen) * scale).to(dtype).to(DEVICE)


def _configs(draw_int):
    """A small random decode tile config, or None (the launcher's own choice)."""
    if draw_int(0, 3) == 0:
        return None
    return KernelConfig(16 << draw_int(0, 1), 16 << draw_int(0, 1), draw_int(1, 4), 4, 1,
                        fused_sum=draw_int(0, 3) > 0, prefetch=draw_int(0, 1) == 1)


TOKENS = st.sampled_from([1, 2, 3, 5, 8, 21])  # >1 token: union kernels (explicit config) or masked GEMMs
DIM = st.integers(1, 72)
DENSITY = st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]) | st.floats(0.0, 1.0)


@pytest.mark.slow
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(T=TOKENS, n=DIM, nB=DIM, m=DIM, density=DENSITY, dtype=st.sampled_from(DTYPES), with_bias=st.booleans(),
       data=st.data())
def test_rank_adapter(T, n, nB, m, density, dtype, with_bias, data):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    x = _rand((T, n), dtype, gen)
    B = _rand((nB, n), dtype, gen, n ** -0.5)
    At = _rand((nB, m), dtype, gen)
    z, _ = rank_adapter_scores(x.cpu(), B.cpu(), torch.zeros(nB))
    thr = _thresholds(z, density, MARGIN[dtype], gen).to(DEVICE)
    bias = _rand((m,), dtype, gen) if with_bias else None
    draw = lambda lo, hi: data.draw(st.integers(lo, hi))  # noqa: E731
    rc, gc = _configs(draw), _configs(draw)
    config = (rc, gc) if rc is not None and gc is not None else None
    with direct_launch():
        y = rank_adapter(x, B, At, thr, bias, config=config)
    ref = rank_adapter_reference(x, B, At, thr, bias)
    assert y.shape == ref.shape and y.dtype == dtype
    assert _rel_err(y, ref) <= _rank_rtol(x, B, At, thr, ref, T, config, dtype)


@pytest.mark.slow
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(T=TOKENS, n=DIM, ranks=st.tuples(DIM, DIM), widths=st.tuples(DIM, DIM), density=DENSITY,
       dtype=st.sampled_from(DTYPES), with_bias=st.booleans(), data=st.data())
def test_rank_adapter_pair(T, n, ranks, widths, density, dtype, with_bias, data):
    """Two rank adapters on one input in shared launches: each output equals its own reference."""
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    x = _rand((T, n), dtype, gen)
    units = []
    for nB, m in zip(ranks, widths):
        B, At = _rand((nB, n), dtype, gen, n ** -0.5), _rand((nB, m), dtype, gen)
        z, _ = rank_adapter_scores(x.cpu(), B.cpu(), torch.zeros(nB))
        thr = _thresholds(z, density, MARGIN[dtype], gen).to(DEVICE)
        units.append((B, At, thr, _rand((m,), dtype, gen) if with_bias else None))
    draw = lambda lo, hi: data.draw(st.integers(lo, hi))  # noqa: E731
    rc, gc = _configs(draw), _configs(draw)
    config = (rc, gc) if rc is not None and gc is not None else None
    with direct_launch():
        ys = rank_adapter_pair(x, *units, config=config)
    for y, unit in zip(ys, units):
        ref = rank_adapter_reference(x, *unit)
        assert y.shape == ref.shape and y.dtype == dtype
        assert _rel_err(y, ref) <= _rank_rtol(x, *unit[:3], ref, T, config, dtype)


@pytest.mark.slow
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(T=TOKENS, n=DIM, m=DIM, density=DENSITY, dtype=st.sampled_from(DTYPES), with_bias=st.booleans(),
       data=st.data())
def test_neuron_adapter(T, n, m, density, dtype, with_bias, data):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    x = _rand((T, n), dtype, gen)
    Wt = _rand((n, m), dtype, gen, n ** -0.5)
    thr = _thresholds(x.cpu().float(), density, MARGIN[dtype], gen).to(DEVICE)
    bias = _rand((m,), dtype, gen) if with_bias else None
    with direct_launch():
        y = neuron_adapter(x, Wt, thr, bias, config=_configs(lambda lo, hi: data.draw(st.integers(lo, hi))))
    ref = neuron_adapter_reference(x, Wt, thr, bias)
    assert y.shape == ref.shape and y.dtype == dtype
    assert _rel_err(y, ref) <= RTOL[dtype]


@pytest.mark.slow
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(T=TOKENS, n=DIM, widths=st.tuples(DIM, DIM), densities=st.tuples(DENSITY, DENSITY),
       dtype=st.sampled_from(DTYPES), with_bias=st.booleans(), data=st.data())
def test_neuron_adapter_pair(T, n, widths, densities, dtype, with_bias, data):
    """Two neuron adapters on one input, each with its own thresholds, in one launch: each output equals
    its own reference."""
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    x = _rand((T, n), dtype, gen)
    units = [(_rand((n, m), dtype, gen, n ** -0.5), _thresholds(x.cpu().float(), d, MARGIN[dtype], gen).to(DEVICE),
              _rand((m,), dtype, gen) if with_bias else None) for m, d in zip(widths, densities)]
    with direct_launch():
        ys = neuron_adapter_pair(x, *units, config=_configs(lambda lo, hi: data.draw(st.integers(lo, hi))))
    for y, unit in zip(ys, units):
        ref = neuron_adapter_reference(x, *unit)
        assert y.shape == ref.shape and y.dtype == dtype
        assert _rel_err(y, ref) <= RTOL[dtype]


@pytest.mark.slow
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(T=TOKENS, n=DIM, m=DIM, density=DENSITY, dtype=st.sampled_from(DTYPES),
       activation=st.sampled_from(["silu", "gelu_tanh", "gelu"]), with_bias=st.booleans(), data=st.data())
def test_gated_neuron_adapter(T, n, m, density, dtype, activation, with_bias, data):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    gate, up = _rand((T, n), dtype, gen, 2.0), _rand((T, n), dtype, gen)
    Wt = _rand((n, m), dtype, gen, n ** -0.5)
    h = gated_activation(gate.cpu(), up.cpu(), activation).float()
    thr = _thresholds(h, density, MARGIN[dtype], gen).to(DEVICE)
    bias = _rand((m,), dtype, gen) if with_bias else None
    with direct_launch():
        y = gated_neuron_adapter(gate, up, Wt, thr, bias, activation,
                                 config=_configs(lambda lo, hi: data.draw(st.integers(lo, hi))))
    ref = neuron_adapter_reference(gated_activation(gate, up, activation), Wt, thr, bias)
    assert y.shape == ref.shape and y.dtype == dtype
    assert _rel_err(y, ref) <= RTOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_rows_equal_single_token_rows(dtype):
    """A batch loads the union of kept rows, yet each row equals that token run alone."""
    gen = torch.Generator().manual_seed(0)
    T, n, nB, m = 6, 48, 40, 36
    x = _rand((T, n), dtype, gen)
    B, At = _rand((nB, n), dtype, gen, n ** -0.5), _rand((nB, m), dtype, gen)
    z, _ = rank_adapter_scores(x.cpu(), B.cpu(), torch.zeros(nB))
    thr = _thresholds(z, 0.4, MARGIN[dtype], gen).to(DEVICE)
    Wt = _rand((n, m), dtype, gen, n ** -0.5)
    thr_n = _thresholds(x.cpu().float(), 0.4, MARGIN[dtype], gen).to(DEVICE)
    cfg = KernelConfig(16, 32, 2)
    with direct_launch():  # explicit configs: the union kernels, not the batched GEMMs
        batch = [rank_adapter(x, B, At, thr, config=(cfg, cfg)), neuron_adapter(x, Wt, thr_n, config=cfg)]
        single = [torch.cat([rank_adapter(x[t:t + 1], B, At, thr) for t in range(T)]),
                  torch.cat([neuron_adapter(x[t:t + 1], Wt, thr_n) for t in range(T)])]
    for yb, ys in zip(batch, single):
        assert _rel_err(yb, ys) <= RTOL[dtype]


@pytest.mark.parametrize("fused_sum, prefetch", [(True, False), (True, True), (False, False)])
def test_outputs_and_workspaces_need_no_fill(monkeypatch, fused_sum, prefetch):
    """Every buffer a launcher takes from ``torch.empty`` is written before it is read: poisoned buffers
    (NaN, or -7 for the int32 tickets) give the same bits, and the tickets are zero again afterwards."""
    gen = torch.Generator().manual_seed(2)
    dtype = torch.bfloat16
    n, nB, m = 72, 48, 40
    x = _rand((1, n), dtype, gen)
    B, At = _rand((nB, n), dtype, gen, n ** -0.5), _rand((nB, m), dtype, gen)
    z, _ = rank_adapter_scores(x.cpu(), B.cpu(), torch.zeros(nB))
    thr = _thresholds(z, 0.5, MARGIN[dtype], gen).to(DEVICE)
    Wt, bias = _rand((n, m), dtype, gen, n ** -0.5), _rand((m,), dtype, gen)
    thr_n = _thresholds(x.cpu().float(), 0.5, MARGIN[dtype], gen).to(DEVICE)
    gemv = KernelConfig(16, 16, 3, 4, fused_sum=fused_sum, prefetch=prefetch)
    calls = [lambda: rank_adapter(x, B, At, thr, bias, config=(KernelConfig(16, 16, 2), gemv)),
             lambda: neuron_adapter(x, Wt, thr_n, bias, config=gemv),
             lambda: gated_neuron_adapter(x, x, Wt, thr_n, None, "silu", config=gemv),
             lambda: rank_adapter_pair(x, (B, At, thr, bias), (B[:29], At[:29, :33], thr[:29], bias[:33]),
                                       config=(KernelConfig(16, 16, 2), gemv)),
             lambda: neuron_adapter_pair(x, (Wt, thr_n, bias), (Wt[:, :23], thr_n.flip(0), bias[:23]), config=gemv)]
    with direct_launch():
        clean = [f() for f in calls]
        empties = []

        def poisoned(*size, dtype=None, **kwargs):
            t = torch.full(size[0] if len(size) == 1 and not isinstance(size[0], int) else size,
                           -7 if dtype == torch.int32 else float("nan"), dtype=dtype, **kwargs)
            empties.append(t)
            return t

        monkeypatch.setattr(torch, "empty", poisoned)
        dirty = [f() for f in calls]
    for a, b in zip(clean, dirty):
        assert all(torch.equal(u, v) for u, v in zip(*((t,) if torch.is_tensor(t) else t for t in (a, b))))
    # the int32 buffers from torch.empty: the two rank routers' tickets, which the routers zero (and with a
    # second sum launch, the unused tickets of the other calls)
    tickets = [t for t in empties if t.dtype == torch.int32]
    routers = tickets if fused_sum else [tickets[0], tickets[3]]
    assert len(routers) == 2 and all((t == 0).all() for t in routers)


def test_persistent_tickets_serve_every_call_and_stay_zero():
    """One ``ticket_buffer`` across calls of different split counts and both neuron kernels: each call
    finds it zero (the results equal the per-call fill's bit for bit) and leaves it zero."""
    gen = torch.Generator().manual_seed(4)
    dtype = torch.bfloat16
    n, m = 90, 70
    x, up = _rand((1, n), dtype, gen), _rand((1, n), dtype, gen)
    Wt, bias = _rand((n, m), dtype, gen, n ** -0.5), _rand((m,), dtype, gen)
    thr = _thresholds(x.cpu().float(), 0.5, MARGIN[dtype], gen).to(DEVICE)
    tickets, tickets2 = ticket_buffer(m, DEVICE), ticket_buffer(m - 17, DEVICE)
    second = (Wt[:, 17:], thr.flip(0), bias[17:])
    configs = [None, KernelConfig(16, 16, 3, 4), KernelConfig(32, 16, 2, 1, prefetch=True), KernelConfig(16, 32, 6)]
    with direct_launch():
        for cfg in configs * 2:
            for call in (lambda **kw: neuron_adapter(x, Wt, thr, bias, config=cfg, **kw),
                         lambda **kw: gated_neuron_adapter(x, up, Wt, thr, None, "silu", config=cfg, **kw)):
                assert torch.equal(call(tickets=tickets), call())
                assert not tickets.any()
            paired = neuron_adapter_pair(x, (Wt, thr, bias), second, config=cfg, tickets=(tickets, tickets2))
            assert all(torch.equal(a, b) for a, b in zip(paired, neuron_adapter_pair(x, (Wt, thr, bias), second,
                                                                                      config=cfg)))
            assert not tickets.any() and not tickets2.any()
    with pytest.raises(ValueError, match="tickets must be int32"):
        neuron_adapter(x, Wt, thr, bias, config=KernelConfig(16, 16, 3), tickets=tickets[:2])


def test_leading_dims_and_prefill_regime():
    """``[batch, seq, n]`` inputs, and a token count past the decode kernels (masked GEMMs)."""
    gen = torch.Generator().manual_seed(1)
    dtype = torch.bfloat16
    x = _rand((2, 19, 40), dtype, gen)
    B, At = _rand((24, 40), dtype, gen, 40 ** -0.5), _rand((24, 33), dtype, gen)
    z, _ = rank_adapter_scores(x.cpu(), B.cpu(), torch.zeros(24))
    thr = _thresholds(z.reshape(-1, 24), 0.5, MARGIN[dtype], gen).to(DEVICE)
    with direct_launch():
        y = rank_adapter(x, B, At, thr)
    assert y.shape == (2, 19, 33)
    ref = rank_adapter_reference(x, B, At, thr)
    assert _rel_err(y, ref) <= _rank_rtol(x, B, At, thr, ref, 38, None, dtype)


def test_bad_shapes_raise():
    x = torch.zeros(1, 8, device=DEVICE)
    with pytest.raises(ValueError, match="do not agree"):
        rank_adapter(x, torch.zeros(4, 9, device=DEVICE), torch.zeros(4, 5, device=DEVICE), torch.zeros(4, device=DEVICE))
    with pytest.raises(ValueError, match="do not agree"):
        neuron_adapter(x, torch.zeros(7, 5, device=DEVICE), torch.zeros(7, device=DEVICE))
    unit = (torch.zeros(4, 8, device=DEVICE), torch.zeros(4, 5, device=DEVICE), torch.zeros(4, device=DEVICE))
    with pytest.raises(ValueError, match="both units need a bias, or neither"):
        rank_adapter_pair(x, (*unit, None), (*unit, torch.zeros(5, device=DEVICE)))
    with pytest.raises(ValueError, match="unknown gated activation"):
        gated_neuron_adapter(x, x, torch.zeros(8, 5, device=DEVICE), torch.zeros(8, device=DEVICE), None, "relu")


def test_decode_ops_pass_opcheck_and_equal_their_launchers():
    """The opaque ``*_decode`` ops (what Inductor calls under CUDA graphs on sm_90+): schema, fake, results."""
    import ranapass.kernels.ops  # noqa: F401  (registers torch.ops.ranapass.*)

    ops = torch.ops.ranapass
    gen = torch.Generator().manual_seed(2)
    dtype = torch.bfloat16
    x, up = _rand((1, 40), dtype, gen), _rand((1, 40), dtype, gen)
    B, At, bias = _rand((24, 40), dtype, gen, 40 ** -0.5), _rand((24, 33), dtype, gen), _rand((33,), dtype, gen)
    B2, At2 = _rand((16, 40), dtype, gen, 40 ** -0.5), _rand((16, 21), dtype, gen)
    Wt = _rand((40, 33), dtype, gen)
    thr_r = _thresholds(rank_adapter_scores(x.cpu(), B.cpu(), torch.zeros(24))[0], 0.5, MARGIN[dtype], gen).to(DEVICE)
    thr_r2 = _thresholds(rank_adapter_scores(x.cpu(), B2.cpu(), torch.zeros(16))[0], 0.5, MARGIN[dtype], gen).to(DEVICE)
    thr_n = _thresholds(x.cpu(), 0.5, MARGIN[dtype], gen).to(DEVICE)
    thr_g = _thresholds(gated_activation(x, up, "silu").cpu(), 0.5, MARGIN[dtype], gen).to(DEVICE)
    cases = [
        (ops.rank_adapter_decode.default, (x, B, At, thr_r, bias), (rank_adapter_reference(x, B, At, thr_r, bias),)),
        (ops.rank_adapter_pair_decode.default, (x, B, At, thr_r, None, B2, At2, thr_r2, None),
         (rank_adapter_reference(x, B, At, thr_r), rank_adapter_reference(x, B2, At2, thr_r2))),
        (ops.neuron_adapter_decode.default, (x, Wt, thr_n, bias, ticket_buffer(33, DEVICE)),
         (neuron_adapter_reference(x, Wt, thr_n, bias),)),
        (ops.neuron_adapter_pair_decode.default, (x, Wt, thr_n, bias, ticket_buffer(33, DEVICE), Wt[:, :19],
                                                  thr_n.flip(0), bias[:19], ticket_buffer(19, DEVICE)),
         (neuron_adapter_reference(x, Wt, thr_n, bias), neuron_adapter_reference(x, Wt[:, :19], thr_n.flip(0),
                                                                                 bias[:19]))),
        (ops.gated_neuron_adapter_decode.default, (x, up, Wt, thr_g, None, None, "silu"),
         (neuron_adapter_reference(gated_activation(x, up, "silu"), Wt, thr_g),)),
    ]
    for op, args, refs in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
        ys = op(*args)
        for y, ref in zip(ys if isinstance(ys, tuple) else (ys,), refs):
            assert y.shape == ref.shape and y.dtype == dtype
            assert _rel_err(y, ref) <= RTOL[dtype]
