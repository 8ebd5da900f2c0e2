"""The FLOP model, as sympy expressions in the token count ``T`` and the attended length ``S``.

Every figure ranapass reports (expected FLOPs of a plan, measured FLOPs of real masks, the budget)
comes from these expressions, so there is one definition of what a FLOP is:

- a multiply-add counts 2 (as ``torch.utils.flop_counter`` does); bias adds are not counted;
- dense linear, W of shape m x n:      ``2 m n`` per token;
- rank adapter with nB static ranks, k(x) kept:
  ``2 n nB`` (B x, always paid) ``+ 2 m k`` (kept columns of A) ``+ 2 nB`` (mask: |z| vs threshold, select);
- neuron adapter with k(x) of n inputs kept: ``2 m k + 2 n`` (mask on the n inputs);
- attention scores: ``4 S d`` per token and head (``q k^T`` and ``p v``, head dim d).

The reference RaNA code ignores the mask cost; ranapass counts it.
"""

from __future__ import annotations

import sympy

__all__ = [
    "T",
    "S",
    "MASK_FLOPS_PER_SCORE",
    "dense_linear",
    "rank_adapter",
    "neuron_adapter",
    "attention_scores",
    "per_token",
    "rank_adapter_per_token",
    "neuron_adapter_per_token",
]

T = sympy.Symbol("T", positive=True, integer=True)
"""Number of tokens processed."""
S = sympy.Symbol("S", positive=True, integer=True)
"""Number of key positions each token attends to."""

MASK_FLOPS_PER_SCORE = 2
"""One compare of ``|score|`` with its threshold and one select, per maskable rank or input."""


def dense_linear(m: int, n: int) -> sympy.Expr:
    """FLOPs of ``y = W x`` with W of shape m x n, for T tokens."""
    return T * 2 * m * n


def rank_adapter(m: int, n: int, rank: int, kept: float | sympy.Expr) -> sympy.Expr:
    """FLOPs of a rank adapter with ``rank`` static ranks of which ``kept`` are used per token."""
    return T * (2 * n * rank + 2 * m * kept + MASK_FLOPS_PER_SCORE * rank)


def neuron_adapter(m: int, n: int, kept: float | sympy.Expr) -> sympy.Expr:
    """FLOPs of a neuron adapter that keeps ``kept`` of the n inputs per token."""
    return T * (2 * m * kept + MASK_FLOPS_PER_SCORE * n)


def attention_scores(num_heads: int, head_dim: int) -> sympy.Expr:
    """FLOPs of ``softmax(q k^T) v`` for T query tokens over S keys (the softmax itself not counted)."""
    return T * S * 4 * num_heads * head_dim


_m, _n, _r, _k = sympy.symbols("m n r k", positive=True)
rank_adapter_per_token = sympy.lambdify((_m, _n, _r, _k), rank_adapter(_m, _n, _r, _k).subs(T, 1), "numpy")
"""Numeric ``rank_adapter`` per token, ``f(m, n, rank, kept)``, vectorised over numpy arrays."""
neuron_adapter_per_token = sympy.lambdify((_m, _n, _k), neuron_adapter(_m, _n, _k).subs(T, 1), "numpy")
"""Numeric ``neuron_adapter`` per token, ``f(m, n, kept)``, vectorised over numpy arrays."""


def per_token(expr: sympy.Expr) -> float:
    """Evaluate an expression that only depends on T at one token."""
    value = expr.subs(T, 1)
    if value.free_symbols:
        raise ValueError(f"expression still depends on {sorted(map(str, value.free_symbols))}: {expr}")
    return float(value)
