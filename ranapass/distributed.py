"""Data-parallel calibration over ``torch.distributed``: who this process is, and the few collectives it needs.

When a process group is initialised (``torchrun ... -m ranapass profile``, or by the caller before
``ranapass.profile``), every process calibrates its shard of the batches (batch ``b`` runs on rank
``b % world``) and the statistics are combined here: sums all-reduced, sampled rows gathered back in
global batch order, so the result equals the single-process one up to float64 summation order. Without
a process group every function is the identity on one process.

A failed collective (a process died, or did not arrive within the group's timeout) raises
``DistributedError`` on the processes still running, so none of them saves a partial profile.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ranapass.errors import RanapassError

__all__ = ["TIMEOUT_ENV", "DistributedError", "rank", "world_size", "is_main", "init_from_env", "timeout_seconds",
           "shard", "all_reduce_sum", "gather_ordered", "check_agreement", "everyone", "shutdown"]

TIMEOUT_ENV = "RANAPASS_DIST_TIMEOUT"
"""Seconds a collective waits for the other processes before failing (default ``DEFAULT_TIMEOUT``)."""

DEFAULT_TIMEOUT = 1800.0

T = TypeVar("T")


class DistributedError(RanapassError):
    """A collective failed: another process died or did not arrive within the timeout."""


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the group (0 without one)."""
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    """Processes in the group (1 without one)."""
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    """True on the process that writes files (rank 0, or the only process)."""
    return rank() == 0


def timeout_seconds() -> float:
    """The collective timeout: ``$RANAPASS_DIST_TIMEOUT`` seconds, else ``DEFAULT_TIMEOUT``."""
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT
    except ValueError:
        raise RanapassError(f"{TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise RanapassError(f"{TIMEOUT_ENV} must be positive, got {raw!r}")
    return value


def init_from_env() -> bool:
    """Initialise the default process group when launched with ``WORLD_SIZE`` > 1 (``torchrun`` sets it).

    NCCL when CUDA is available (each process on ``cuda:LOCAL_RANK``), gloo otherwise; the timeout is
    ``timeout_seconds()``. Returns whether a group of several processes is active.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return _active()
    if not dist.is_available():
        raise RanapassError("WORLD_SIZE > 1 but this torch build has no torch.distributed: run one process")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_seconds()))
    return _active()


def shard(items: Sequence[T]) -> list[tuple[int, T]]:
    """This process's share of ``items`` with their global indices: item ``i`` goes to rank ``i % world``."""
    r, w = rank(), world_size()
    return [(i, items[i]) for i in range(r, len(items), w)]


@contextlib.contextmanager
def _collective(what: str) -> Iterator[None]:
    """Turn a failed collective into a ``DistributedError`` that says what was being combined."""
    try:
        yield
    except (RuntimeError, ConnectionError) as e:   # DistBackendError and DistError are RuntimeErrors
        raise DistributedError(
            f"rank {rank()} of {world_size()}: combining {what} across processes failed ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:300]}). Another process died or did not arrive within "
            f"{timeout_seconds():.0f} s (set {TIMEOUT_ENV}); nothing was saved") from e


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(tensors: Sequence[torch.Tensor], what: str = "statistics") -> None:
    """Sum each tensor over all processes, in place (each where it lives; sent through the backend's device)."""
    if not _active():
        return
    device = _comm_device()
    with _collective(what):
        for t in tensors:
            buffer = t if t.device == device else t.to(device)
            dist.all_reduce(buffer)
            if buffer is not t:
                t.copy_(buffer)


def gather_ordered(keyed: Sequence[tuple[int, Any]], what: str = "samples") -> list[Any]:
    """Every process's ``(key, item)`` pairs, items sorted by key (stable: a key's items keep their order).

    Keys are global batch or site indices; the result is the same list on every process.
    """
    if not _active():
        return [item for _, item in sorted(keyed, key=lambda p: p[0])]
    gathered: list[Any] = [None] * world_size()
    with _collective(what):
        dist.all_gather_object(gathered, [(k, _to_cpu(v)) for k, v in keyed])
    pairs = [p for part in gathered for p in part]
    return [item for _, item in sorted(pairs, key=lambda p: p[0])]


def _to_cpu(value: Any) -> Any:
    return value.cpu() if isinstance(value, torch.Tensor) else value


def check_agreement(facts: dict[str, str]) -> None:
    """Refuse, on every process, to go on unless all processes have the same ``facts`` (e.g. weights' fingerprints)."""
    if not _active():
        return
    gathered: list[Any] = [None] * world_size()
    with _collective("fingerprints"):
        dist.all_gather_object(gathered, facts)
    for name in facts:
        values = [g.get(name) for g in gathered]
        if len(set(values)) > 1:
            per_rank = ", ".join(f"rank {i}: {v}" for i, v in enumerate(values))
            raise RanapassError(f"the processes disagree on the {name} ({per_rank}): every process must load the "
                                f"same model and calibration data; nothing was calibrated")


def everyone(flag: bool) -> bool:
    """True when ``flag`` is true on every process (e.g. every process finds the cached profile)."""
    if not _active():
        return flag
    value = torch.tensor([0 if flag else 1], dtype=torch.int64, device=_comm_device())
    with _collective("a flag"):
        dist.all_reduce(value)
    return int(value) == 0


def shutdown() -> None:
    """Destroy the default process group, if one is initialised."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
