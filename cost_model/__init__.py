"""FLOP accounting and rank allocation (import name ``ranapass.cost_model``)."""

from ranapass.cost_model.model_flops import dense_flops, per_token_at

__all__ = ["dense_flops", "per_token_at"]
