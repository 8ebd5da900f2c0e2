"""Plans for tests, built straight from a model's weights (no calibration pipeline).

Units are the model's linears grouped by shared input (found with forward pre-hooks, so q/k/v and
gate/up group themselves on any architecture; the output embeddings stay out). Each unit gets:

- a rank adapter from the SVD of its stacked weight ``W = U S V^T``: ``A = U[:, :r]``, ``B = A^T W``,
  ``At = A^T`` (or A from the output PCA on the example tokens, ``data_aware=True``), with thresholds
  at the ``1 - keep`` quantile of ``|B x|`` over the example tokens;
- or a neuron adapter (where the input is wider than the output, like a down projection), with
  thresholds ``tau / ||W[:, j]||`` at the ``1 - keep`` quantile of ``|x_j| ||W[:, j]||``.

``keep=1.0`` at full rank gives thresholds 0: every rank/input is kept and the adapters reproduce
the dense model up to rounding (the "budget 1.0" plan).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import pytest
import torch

from ranapass import NeuronAdapterSpec, Plan, RankAdapterSpec, UnitPlan, weights_fingerprint


def _call(model: torch.nn.Module, example: Any) -> Any:
    return model(**example) if isinstance(example, dict) else model(example)


@torch.no_grad()
def linear_inputs(model: torch.nn.Module, example: Any) -> tuple[list[list[str]], dict[str, torch.Tensor]]:
    """Groups of linear paths that read the same input tensor, and each linear's input as ``[N, n]`` float64."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = {name: m for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and m is not out_emb}
    seen: list[tuple[torch.Tensor, list[str]]] = []
    handles = []

    def hook(name):
        def pre(_module, args):
            for x, names in seen:
                if x is args[0]:
                    names.append(name)
                    return
            seen.append((args[0], [name]))
        return pre

    for name, m in linears.items():
        handles.append(m.register_forward_pre_hook(hook(name)))
    try:
        _call(model, example)
    finally:
        for h in handles:
            h.remove()
    inputs = {names[0]: x.reshape(-1, x.shape[-1]).double() for x, names in seen}
    return [names for _, names in seen], inputs


def _unit_name(members: list[str]) -> str:
    if len(members) == 1:
        return members[0]
    prefix = os.path.commonprefix(members)
    prefix = prefix[: prefix.rfind(".") + 1]
    return prefix + "{" + ",".join(m[len(prefix):] for m in members) + "}"


def _quantile(values: torch.Tensor, q: float) -> float:
    values = values.flatten()
    if values.numel() > 1_000_000:  # torch.quantile's input limit
        values = values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(0))[:1_000_000]]
    return float(torch.quantile(values.float(), q))


def _rank_unit(weight: torch.Tensor, x: torch.Tensor, keep: float, rank_fraction: float, data_aware: bool,
               members: list[str], outs: list[int]) -> tuple[RankAdapterSpec, float]:
    rank = max(1, round(rank_fraction * min(weight.shape)))
    if data_aware:  # top eigenvectors of W C W^T, C = sum x x^T: the output PCA on the calibration tokens
        _, vecs = torch.linalg.eigh(weight @ (x.t() @ x) @ weight.t())
        A = vecs.flip(-1)[:, :rank]
    else:  # left singular vectors of W: exact at full rank whatever the data
        A = torch.linalg.svd(weight, full_matrices=False)[0][:, :rank]
    B = A.t() @ weight
    z = (x @ B.t()).abs()
    tau = 0.0 if keep >= 1.0 else _quantile(z, 1.0 - keep)
    thresholds = torch.full((rank,), tau, dtype=torch.float32) / A.norm(dim=0).float()
    kept = float((z >= thresholds.double()).sum(-1).double().mean())
    spec = RankAdapterSpec(members=tuple(members), out_features=tuple(outs), in_features=weight.shape[1],
                           tau=tau, B=B.float(), At=A.t().contiguous().float(), thresholds=thresholds)
    return spec, kept


def _neuron_unit(weight: torch.Tensor, x: torch.Tensor, keep: float,
                 members: list[str], outs: list[int]) -> tuple[NeuronAdapterSpec, float]:
    norms = weight.norm(dim=0)  # ||W[:, j]||
    score = x.abs() * norms
    tau = 0.0 if keep >= 1.0 else _quantile(score, 1.0 - keep)
    thresholds = (tau / norms.clamp_min(1e-12)).float()
    kept = float((x.abs() >= thresholds.double()).sum(-1).double().mean())
    spec = NeuronAdapterSpec(members=tuple(members), out_features=tuple(outs), in_features=weight.shape[1],
                             tau=tau, thresholds=thresholds)
    return spec, kept


@torch.no_grad()
def build_plan(model: torch.nn.Module, example: Any, *, keep: float = 0.5, rank_fraction: float = 1.0,
               data_aware: bool = False, neuron: str = "wide", group: bool = True,
               dense: Iterable[str] = ()) -> Plan:
    """A plan for ``model`` from its weights, thresholds fitted on ``example`` (model inputs).

    Args:
        keep: fraction of ranks/inputs kept per token on the example (1.0: thresholds 0).
        rank_fraction: static rank of the rank adapters, as a fraction of ``min(m, n)``.
        data_aware: rank adapters from the output PCA on the example (as RaNA does) instead of the SVD.
        neuron: where neuron adapters go: "wide" (in > out), "single" (units of one linear), "all" or
            "none" (rank adapters only).
        group: group linears that read the same input into one unit (else one unit per linear).
        dense: member paths whose unit stays dense.
    """
    if neuron not in ("wide", "single", "all", "none"):
        raise ValueError(f"neuron must be 'wide', 'single', 'all' or 'none', got {neuron!r}")
    groups, inputs = linear_inputs(model, example)
    if not group:
        inputs = {m: inputs[g[0]] for g in groups for m in g}
        groups = [[m] for g in groups for m in g]
    dense = set(dense)
    units = []
    for members in groups:
        modules = [model.get_submodule(m) for m in members]
        outs = [m.out_features for m in modules]
        n = modules[0].in_features
        unit = UnitPlan(_unit_name(members), tuple(members), tuple(outs), n)
        if not dense & set(members):
            weight = torch.cat([m.weight.detach().double() for m in modules])
            x = inputs[members[0]]
            if neuron == "all" or (neuron == "wide" and n > sum(outs)) or (neuron == "single" and len(members) == 1):
                unit.adapter, unit.expected_kept = _neuron_unit(weight, x, keep, members, outs)
            else:
                unit.adapter, unit.expected_kept = _rank_unit(weight, x, keep, rank_fraction, data_aware,
                                                              members, outs)
        units.append(unit)
    plan = Plan(units, budget=1.0, allocation="tests", fingerprint=weights_fingerprint(model))
    plan.budget = round(plan.expected_ratio(), 4)
    return plan


# ---------------------------------------------------------------------------------------- tiny models
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=128)


class MLP(torch.nn.Module):
    """A plain two-layer MLP with biases: the smallest model with linears."""

    def __init__(self, width: int = 64, hidden: int = 128):
        super().__init__()
        self.up = torch.nn.Linear(width, hidden)
        self.down = torch.nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.gelu(self.up(x)))


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A random-weight model of ``arch`` (an HF architecture name, or "mlp"), small enough to compile in seconds."""
    import transformers

    torch.manual_seed(seed)
    if arch == "mlp":
        return MLP().eval()
    extra = {
        "GPTNeoXForCausalLM": dict(num_key_value_heads=None, rotary_pct=0.5, use_parallel_residual=True),
        "Phi3ForCausalLM": dict(pad_token_id=0, bos_token_id=1, eos_token_id=2),
        "GemmaForCausalLM": dict(head_dim=16),
        "MistralForCausalLM": dict(sliding_window=None),
    }.get(arch, {})
    kwargs = {**TINY, **extra}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    cls = getattr(transformers, arch)
    config = cls.config_class(**kwargs)
    return cls(config).eval()


def tiny_inputs(arch: str, batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    """Random model inputs: token ids for language models, features for the MLP."""
    g = torch.Generator().manual_seed(seed)
    if arch == "mlp":
        return torch.randn(batch, length, 64, generator=g)
    return torch.randint(0, TINY["vocab_size"], (batch, length), generator=g)


# ---------------------------------------------------------------------------------------- helpers
def logits(model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The model's output tensor: logits of a causal LM, the plain output of the MLP."""
    out = model(inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float32."""
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture
def fresh_dynamo():
    """Reset Dynamo around a test, so compile counts and caches never leak between tests."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()
