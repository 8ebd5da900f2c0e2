"""Dense FLOPs of a whole model, per part, as sympy expressions in ``T`` (tokens) and ``S`` (keys).

Parts:

- ``block_linears``: every ``nn.Linear`` except the output embedding: the linears RaNA adapts, and
  the denominator of a budget;
- ``lm_head``: the output embedding (``model.get_output_embeddings()``), when it is an ``nn.Linear``;
- ``attention``: ``softmax(q k^T) v`` of every layer, from the Hugging Face config
  (layers x heads x head dim, see :func:`ranapass.cost_model.flops.attention_scores`);
- ``total``: their sum.

Embedding lookups, norms, activations and the softmax are not counted.
"""

from __future__ import annotations

import logging

import sympy
import torch

from ranapass.cost_model import flops

__all__ = ["dense_flops", "per_token_at"]

log = logging.getLogger(__name__)


def _attention(model: torch.nn.Module) -> sympy.Expr:
    config = getattr(model, "config", None)
    if config is None:
        log.info("%s has no Hugging Face config: attention FLOPs are not counted", type(model).__name__)
        return sympy.Integer(0)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", None)
    heads = getattr(text, "num_attention_heads", None)
    if layers is None or heads is None:
        raise ValueError(f"{type(text).__name__} lacks num_hidden_layers/num_attention_heads: cannot count "
                         "attention FLOPs")
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return layers * flops.attention_scores(heads, head_dim)


def dense_flops(model: torch.nn.Module) -> dict[str, sympy.Expr]:
    """FLOPs of ``model`` with every linear dense, per part (see the module docstring).

    Args:
        model: a Hugging Face model, or any ``nn.Module`` (attention is then counted as 0).

    Returns:
        ``{"block_linears", "lm_head", "attention", "total"}`` -> sympy expression in ``T`` and ``S``.

    Example::

        >>> f = dense_flops(model)  # doctest: +SKIP
        >>> per_token_at(f, seq_len=512)["block_linears"]  # doctest: +SKIP
        212336640.0
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    block = sympy.Integer(0)
    lm_head = sympy.Integer(0)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            cost = flops.dense_linear(module.out_features, module.in_features)
            if module is head:
                lm_head += cost
            else:
                block += cost
    attention = _attention(model)
    return {"block_linears": block, "lm_head": lm_head, "attention": attention,
            "total": block + lm_head + attention}


def per_token_at(exprs: dict[str, sympy.Expr], seq_len: int) -> dict[str, float]:
    """Evaluate FLOP expressions per token, with attention over ``seq_len`` keys (``S = seq_len``)."""
    return {name: flops.per_token(expr.subs(flops.S, seq_len)) for name, expr in exprs.items()}
