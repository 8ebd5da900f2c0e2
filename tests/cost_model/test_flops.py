"""The sympy FLOP model against torch's own FLOP counter on the reference path."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ranapass.cost_model import flops


def _counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("m,n,rank", [(24, 16, 16), (7, 33, 5), (96, 64, 40)])
def test_rank_adapter_flops_match_counter(m, n, rank):
    """Per token, a rank adapter that gathers its kept ranks does 2 n nB + 2 m k multiply-adds."""
    torch.manual_seed(0)
    B, At = torch.randn(rank, n), torch.randn(rank, m)
    for x in torch.randn(5, n):
        z = B @ x
        kept = (z.abs() >= 0.8).nonzero().squeeze(1)
        counted = _counted(lambda: (B @ x.unsqueeze(1), At.index_select(0, kept).t() @ z[kept].unsqueeze(1)))
        model = flops.per_token(flops.rank_adapter(m, n, rank, kept.numel()))
        assert counted == model - flops.MASK_FLOPS_PER_SCORE * rank


@pytest.mark.parametrize("m,n", [(24, 16), (5, 31)])
def test_neuron_adapter_flops_match_counter(m, n):
    torch.manual_seed(1)
    wt = torch.randn(n, m)
    for x in torch.randn(4, n):
        kept = (x.abs() >= 0.7).nonzero().squeeze(1)
        counted = _counted(lambda: wt.index_select(0, kept).t() @ x[kept].unsqueeze(1))
        assert counted == flops.per_token(flops.neuron_adapter(m, n, kept.numel())) - flops.MASK_FLOPS_PER_SCORE * n


def test_dense_and_attention_expressions():
    counted = _counted(lambda: torch.nn.functional.linear(torch.randn(9, 16), torch.randn(24, 16)))
    assert counted == flops.dense_linear(24, 16).subs(flops.T, 9)
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 11, 8), torch.randn(1, 2, 11, 8)
    counted = _counted(lambda: (q @ k.transpose(-1, -2)).softmax(-1) @ v)
    assert counted == flops.attention_scores(2, 8).subs({flops.T: 5, flops.S: 11})


def test_numeric_forms_agree_with_sympy():
    assert flops.rank_adapter_per_token(30, 20, 12, 7.5) == flops.per_token(flops.rank_adapter(30, 20, 12, 7.5))
    assert flops.neuron_adapter_per_token(30, 20, 7.5) == flops.per_token(flops.neuron_adapter(30, 20, 7.5))
    with pytest.raises(ValueError, match="still depends"):
        flops.per_token(flops.attention_scores(2, 8))
