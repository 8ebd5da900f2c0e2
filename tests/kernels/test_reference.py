"""The adapter reference math: exactness at full rank / full keep, masks per token, dtypes."""

import pytest
import torch

from ranapass.kernels.reference import (gated_activation, neuron_adapter_reference, rank_adapter_reference,
                                        rank_adapter_scores)

DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)]


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4)])
def test_rank_adapter_full_rank_is_dense(dtype, tol, shape):
    torch.manual_seed(0)
    w = torch.randn(24, 16)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    B, At = u.t() @ w, u.t().contiguous()
    x = torch.randn(*shape, 16)
    y = rank_adapter_reference(x.to(dtype), B.to(dtype), At.to(dtype), torch.zeros(16), None)
    ref = x @ w.t()
    assert y.dtype == dtype and y.shape == (*shape, 24)
    assert (y.float() - ref).norm() / ref.norm() < tol


def test_rank_adapter_masks_per_token():
    torch.manual_seed(1)
    B, At = torch.randn(6, 8), torch.randn(6, 5)
    t = torch.full((6,), 1.0)
    x = torch.randn(4, 8)
    y = rank_adapter_reference(x, B, At, t, torch.ones(5))
    for i in range(4):
        z = B @ x[i]
        keep = z.abs() >= 1.0
        assert torch.allclose(y[i], (z * keep) @ At + 1, atol=1e-5)
    z, keep = rank_adapter_scores(x, B, t)
    assert keep.shape == (4, 6) and torch.equal(keep, z.abs() >= 1.0)


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_neuron_adapter(dtype, tol):
    torch.manual_seed(2)
    x, wt, b = torch.randn(3, 10), torch.randn(10, 4), torch.randn(4)
    t = torch.rand(10)
    y = neuron_adapter_reference(x.to(dtype), wt.to(dtype), t, b.to(dtype))
    keep = x.to(dtype).float().abs() >= t
    ref = (x.to(dtype).float() * keep) @ wt.to(dtype).float() + b.to(dtype).float()
    assert (y.float() - ref).norm() / ref.norm() < tol
    assert torch.allclose(neuron_adapter_reference(x, wt, torch.zeros(10), b), x @ wt + b, atol=1e-5)


def test_gated_activation_rejects_unknown():
    g, u = torch.randn(3), torch.randn(3)
    assert torch.allclose(gated_activation(g, u, "silu"), torch.nn.functional.silu(g) * u)
    with pytest.raises(ValueError, match="unknown gated activation"):
        gated_activation(g, u, "relu6")
