"""Layers offloaded by accelerate (CPU or disk offload): their weights are read in place, one module at a time.

``load_model(..., device_map="auto", max_memory=...)`` may leave some layers' parameters on the meta
device, loaded onto their execution device only while their forward runs. Reading such a weight
(fingerprint, candidates, plan building) needs it loaded for the moment: ``onloaded``. Running an
adapter in place of such a layer is not supported: ``refuse_offloaded`` says so.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterable, Iterator

import torch

from ranapass.errors import RanapassError

__all__ = ["is_offloaded", "execution_device", "onloaded", "refuse_offloaded"]


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


def refuse_offloaded(modules: dict[str, torch.nn.Module], what: str) -> None:
    """Raise ``RanapassError`` if any of ``modules`` (path -> module) is offloaded."""
    offloaded = [path for path, module in modules.items() if is_offloaded(module)]
    if offloaded:
        raise RanapassError(f"{what} needs the adapted layers' weights on a device, but {len(offloaded)} of them are "
                            f"offloaded by accelerate (e.g. {offloaded[0]!r}): load the model with a device_map "
                            "and max_memory that keep every layer on a GPU or the CPU")
