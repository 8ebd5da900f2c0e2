"""Layers offloaded by accelerate (CPU or disk offload): their weights are read in place, one module at a time.

``load_model(..., device_map="auto", max_memory=...)`` may leave some layers' parameters on the meta
device, loaded onto their execution device only while their forward runs. Reading such a weight
(fingerprint, candidates, plan building, binding an adapter) needs it loaded for the moment: ``onloaded``.
An adapter bound so lives on the layer's execution device and runs in place of the layer, eagerly or
compiled (``ranapass.attach``). accelerate's hooks break Dynamo's graph at every hooked module, so a
compiled model under them is one graph per hooked module: ``torch._dynamo.config.recompile_limit`` must
exceed their number, or the frames past it run eagerly and dense, which ``RanaBackend.check`` reports.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterable, Iterator

import torch


__all__ = ["is_offloaded", "execution_device", "onloaded"]


def is_offloaded(module: torch.nn.Module) -> bool:
    """True when accelerate keeps ``module``'s own parameters offloaded (meta until its forward runs)."""
    if not hasattr(module, "_hf_hook") or importlib.util.find_spec("accelerate") is None:
        return False
    from accelerate.utils import has_offloaded_params

    return has_offloaded_params(module)


def execution_device(module: torch.nn.Module) -> torch.device:
    """Where ``module`` computes: its weight's device, or accelerate's execution device when it is offloaded."""
    if is_offloaded(module):
        return torch.device(module._hf_hook.execution_device)
    return module.weight.device


@contextlib.contextmanager
def onloaded(modules: Iterable[torch.nn.Module]) -> Iterator[None]:
    """Inside the block, the offloaded ones among ``modules`` hold their real weights (on their execution device)."""
    with contextlib.ExitStack() as stack:
        for module in modules:
            if is_offloaded(module):
                from accelerate.utils import align_module_device

                stack.enter_context(align_module_device(module))
        yield

