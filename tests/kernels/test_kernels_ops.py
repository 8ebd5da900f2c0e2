"""The ``torch.ops.ranapass`` ops on CPU: schema and fake implementation (opcheck), and their results
against an independent float64 computation of the masked formulas.

Thresholds keep clear of every score by a margin wider than the input dtype's rounding, so no mask
decision depends on the precision the op computes its scores in.
"""

from __future__ import annotations

import pytest
import torch

import ranapass.kernels.ops  # noqa: F401  (registers torch.ops.ranapass.*)
from ranapass.kernels.neuron_adapter import ticket_buffer

OPS = torch.ops.ranapass
MARGIN = {torch.float32: 1e-4, torch.bfloat16: 3e-2}  # relative distance of every threshold from every score
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}  # ||y - ref|| / ||ref||


def _args(dtype: torch.dtype, with_bias: bool):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 24, generator=g).to(dtype)
    B, At = (torch.randn(10, 24, generator=g) * 24 ** -0.5).to(dtype), torch.randn(10, 17, generator=g).to(dtype)
    Wt = (torch.randn(24, 17, generator=g) * 24 ** -0.5).to(dtype)
    bias = torch.randn(17, generator=g).to(dtype) if with_bias else None
    return x, B, At, Wt, bias


def _clear_thresholds(scores: torch.Tensor, margin: float) -> torch.Tensor:
    """Per-column thresholds (float32) near the median ``|score|``, none within ``margin`` of a score."""
    mag = scores.abs().reshape(-1, scores.shape[-1]).double()
    thr = mag.median(0).values * torch.linspace(0.6, 1.4, mag.shape[-1], dtype=torch.float64)
    for _ in range(100):
        near = ((mag - thr).abs() <= margin * torch.maximum(mag, thr)).any(0)
        if not near.any():
            return thr.float()
        thr = torch.where(near, thr * (1 + 3 * margin), thr)
    raise AssertionError("no thresholds clear of the scores")


def _masked(v: torch.Tensor, thresholds: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """float64 ``where(|v| >= t, v, 0) @ W + bias``: the masked formula of both adapter kinds."""
    y = torch.where(v.abs() >= thresholds.double(), v, 0.0) @ W.double()
    return y if bias is None else y + bias.double()


def _check(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert y.shape == ref.shape and y.dtype == dtype
    assert (y.double() - ref).norm() <= RTOL[dtype] * ref.norm()


@pytest.mark.parametrize("dtype, with_bias", [(torch.float32, False), (torch.bfloat16, True)])
def test_ops_pass_opcheck_and_equal_float64_math_on_cpu(dtype, with_bias):
    x, B, At, Wt, bias = _args(dtype, with_bias)
    up = (x * 0.5).flip(-1)
    z = x.double() @ B.double().t()
    h = torch.nn.functional.silu(x.double()) * up.double()
    thr_r, thr_n, thr_g = (_clear_thresholds(s, MARGIN[dtype]) for s in (z, x.double(), h))
    cases = [(OPS.rank_adapter.default, (x, B, At, thr_r, bias), _masked(z, thr_r, At, bias)),
             (OPS.neuron_adapter.default, (x, Wt, thr_n, bias, ticket_buffer(17, "cpu")),
              _masked(x.double(), thr_n, Wt, bias)),
             (OPS.gated_neuron_adapter.default, (x, up, Wt, thr_g, bias, None, "silu"), _masked(h, thr_g, Wt, bias))]
    for op, args, ref in cases:
        torch.library.opcheck(op, args)
        _check(op(*args), ref, dtype)
    assert all(0 < (s.abs() >= t).float().mean() < 1 for s, t in ((z, thr_r), (x, thr_n), (h, thr_g)))


@pytest.mark.parametrize("dtype, with_bias", [(torch.float32, False), (torch.bfloat16, True)])
def test_rank_adapter_pair_is_two_rank_adapters(dtype, with_bias):
    x, B, At, _, bias = _args(dtype, with_bias)
    B2, At2 = B[:7] * 2, At[:7, :13]
    bias2 = bias[:13] if with_bias else None
    z1, z2 = x.double() @ B.double().t(), x.double() @ B2.double().t()
    thr, thr2 = _clear_thresholds(z1, MARGIN[dtype]), _clear_thresholds(z2, MARGIN[dtype])
    args = (x, B, At, thr, bias, B2, At2, thr2, bias2)
    torch.library.opcheck(OPS.rank_adapter_pair.default, args)
    y1, y2 = OPS.rank_adapter_pair(*args)
    _check(y1, _masked(z1, thr, At, bias), dtype)
    _check(y2, _masked(z2, thr2, At2, bias2), dtype)


@pytest.mark.parametrize("dtype, with_bias", [(torch.float32, False), (torch.bfloat16, True)])
def test_neuron_adapter_pair_is_two_neuron_adapters(dtype, with_bias):
    x, _, _, Wt, bias = _args(dtype, with_bias)
    Wt2, thr = Wt[:, :11] * 2, _clear_thresholds(x.double(), MARGIN[dtype])
    thr2 = thr.flip(0)
    bias2 = bias[:11] if with_bias else None
    args = (x, Wt, thr, bias, ticket_buffer(Wt.shape[1], "cpu"), Wt2, thr2, bias2, None)
    torch.library.opcheck(OPS.neuron_adapter_pair.default, args)
    y1, y2 = OPS.neuron_adapter_pair(*args)
    _check(y1, _masked(x.double(), thr, Wt, bias), dtype)
    _check(y2, _masked(x.double(), thr2, Wt2, bias2), dtype)


def test_traced_decode_calls_become_opaque_ops_only_under_cuda_graphs_with_pdl(monkeypatch):
    """``launch_opaque``: a traced decode call becomes its ``*_decode`` op only with CUDA graphs and PDL
    in Inductor's kernels, on a card that has it."""
    from torch._inductor import config
    from torch._library.triton import set_wrap_triton_enabled

    from ranapass.kernels import launch, ops

    cuda = torch.device("cuda")
    monkeypatch.setattr(launch, "pdl_supported", lambda device: device.type == "cuda")
    both = {"triton.cudagraphs": True, "triton.enable_pdl": True}
    with set_wrap_triton_enabled(True):  # what torch.compile's tracing of a triton_op sets
        with config.patch(both):
            assert launch.launch_opaque(cuda)
        for off in ("triton.cudagraphs", "triton.enable_pdl"):
            with config.patch({**both, off: False}):
                assert not launch.launch_opaque(cuda)
    with set_wrap_triton_enabled(False), config.patch(both):  # eager: launched directly
        assert not launch.launch_opaque(cuda)
    monkeypatch.setattr(launch, "pdl_supported", lambda device: False)
    with set_wrap_triton_enabled(True), config.patch(both):
        assert not launch.launch_opaque(cuda)

    monkeypatch.setattr(ops, "launch_opaque", lambda device: True)  # only decode token counts go opaque
    assert ops._opaque(torch.empty(1, 1, 64)) and ops._opaque(torch.empty(1, 64))
    assert not ops._opaque(torch.empty(4, 128, 64))
