"""The small Llama and token windows most tests use, from :mod:`architectures` (the one tiny-model factory)."""

from architectures import tiny_llama, token_windows

__all__ = ["tiny_llama", "token_windows"]
