"""The ``torch.ops.ranapass`` ops on CPU: schema and fake implementation (opcheck), the reference branch."""

from __future__ import annotations

import pytest
import torch

import ranapass.kernels.ops  # noqa: F401  (registers torch.ops.ranapass.*)
from ranapass.kernels.neuron_adapter import ticket_buffer
from ranapass.kernels.reference import gated_activation, neuron_adapter_reference, rank_adapter_reference

OPS = torch.ops.ranapass


def _args(dtype: torch.dtype, with_bias: bool):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 24, generator=g).to(dtype)
    B, At = torch.randn(10, 24, generator=g).to(dtype), torch.randn(10, 17, generator=g).to(dtype)
    Wt = torch.randn(24, 17, generator=g).to(dtype)
    bias = torch.randn(17, generator=g).to(dtype) if with_bias else None
    return x, B, At, Wt, torch.rand(10, generator=g), torch.rand(24, generator=g), bias


@pytest.mark.parametrize("dtype, with_bias", [(torch.float32, False), (torch.bfloat16, True)])
def test_ops_pass_opcheck_and_equal_the_reference_on_cpu(dtype, with_bias):
    x, B, At, Wt, thr_r, thr_n, bias = _args(dtype, with_bias)
    up = x * 0.5
    cases = [(OPS.rank_adapter.default, (x, B, At, thr_r, bias), rank_adapter_reference(x, B, At, thr_r, bias)),
             (OPS.neuron_adapter.default, (x, Wt, thr_n, bias, ticket_buffer(17, "cpu")),
              neuron_adapter_reference(x, Wt, thr_n, bias)),
             (OPS.gated_neuron_adapter.default, (x, up, Wt, thr_n, bias, None, "silu"),
              neuron_adapter_reference(gated_activation(x, up, "silu"), Wt, thr_n, bias))]
    for op, args, ref in cases:
        torch.library.opcheck(op, args)
        y = op(*args)
        assert y.shape == (2, 3, 17) and y.dtype == dtype
        torch.testing.assert_close(y, ref, rtol=0, atol=0)


@pytest.mark.parametrize("dtype, with_bias", [(torch.float32, False), (torch.bfloat16, True)])
def test_rank_adapter_pair_is_two_rank_adapters(dtype, with_bias):
    x, B, At, _, thr, _, bias = _args(dtype, with_bias)
    B2, At2, thr2 = B[:7] * 2, At[:7, :13], thr[:7]
    bias2 = bias[:13] if with_bias else None
    args = (x, B, At, thr, bias, B2, At2, thr2, bias2)
    torch.library.opcheck(OPS.rank_adapter_pair.default, args)
    y1, y2 = OPS.rank_adapter_pair(*args)
    torch.testing.assert_close(y1, OPS.rank_adapter(x, B, At, thr, bias), rtol=0, atol=0)
    torch.testing.assert_close(y2, OPS.rank_adapter(x, B2, At2, thr2, bias2), rtol=0, atol=0)



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
