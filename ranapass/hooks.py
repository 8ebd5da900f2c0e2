"""Forward hooks installed for the length of a ``with`` block, and always removed after it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch

__all__ = ["forward_hooks"]


@contextlib.contextmanager
def forward_hooks(hooks: Iterable[tuple[torch.nn.Module, Callable]], *, pre: bool = False,
                  with_kwargs: bool = False) -> Iterator[None]:
    """Register ``(module, hook)`` pairs as forward hooks (``pre=True``: forward pre-hooks) inside the block;
    ``with_kwargs=True`` passes the call's keyword arguments to the hooks too (PyTorch's flag of that name).

    Example::

        with forward_hooks([(linear, record)], pre=True):
            model(ids)
    """
    handles = []
    try:
        for module, hook in hooks:
            register = module.register_forward_pre_hook if pre else module.register_forward_hook
            handles.append(register(hook, with_kwargs=with_kwargs))
        yield
    finally:
        for handle in handles:
            handle.remove()
