"""Forward hooks installed for the length of a ``with`` block, and always removed after it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch

__all__ = ["forward_hooks"]


@contextlib.contextmanager
def forward_hooks(hooks: Iterable[tuple[torch.nn.Module, Callable]], *, pre: bool = False) -> Iterator[None]:
    """Register ``(module, hook)`` pairs as forward hooks (``pre=True``: forward pre-hooks) inside the block.

    Example::

        with forward_hooks([(linear, record)], pre=True):
            model(ids)
    """
    handles = []
    try:
        for module, hook in hooks:
            handles.append(module.register_forward_pre_hook(hook) if pre else module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
