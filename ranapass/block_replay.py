"""Block replay: a forward that returns the recorded dense outputs of the blocks it leaves as they are.

A loss-calibration probe adapts the units of some blocks and runs the model on the held-out windows
(``ranapass.loss_calibration``). Every block that runs before the first adapted one sees exactly the
inputs it saw in the dense forward, so its output is the one recorded then: returning that instead of
running the block makes the probe of the k-th of L blocks compute only the blocks from k on, about half
the work of the block probes.

Which blocks may be replayed is read from the dense forward itself, not from the module names: those that
returned before the first call of any linear the probe adapts, each called exactly once per forward, in
the same order in every batch. Outputs stay on their block's device (on a
GPU about ``blocks x tokens x hidden`` values: 0.3 GB for 2 windows of 512 tokens at Llama-2-7B shapes in
bfloat16), recorded and returned as clones, since the model may change a block's output in place.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils._pytree import tree_map

from ranapass.hooks import forward_hooks

__all__ = ["BlockReplay"]


def _clone(tree: Any) -> Any:
    return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, tree)


class BlockReplay:
    """The dense outputs of ``blocks`` (module paths of ``model``), batch by batch, to replay in later forwards.

    ``units`` are the module paths a later forward may change (the linears a probe adapts): a block is
    replayed for a set of them only if it returned, in every recorded forward, before the first of them
    was called, so that all it computed came from modules that forward leaves as they are.

    Example::

        replay = BlockReplay(model, blocks=["model.layers.0", "model.layers.1"], units=linears)
        for i, batch in enumerate(batches):
            with replay.recording(i):
                model(batch)
        skip = replay.before(["model.layers.1.mlp.up_proj"])   # ["model.layers.0"]
        with replay.replaying(0, skip):
            model(batches[0])                                  # layer 0 is not run
    """

    def __init__(self, model: torch.nn.Module, blocks: Iterable[str], units: Iterable[str]):
        found: dict[str, torch.nn.Module] = {}
        for path in dict.fromkeys(blocks):
            try:
                found[path] = model.get_submodule(path)
            except AttributeError:
                continue
        owners = Counter(id(m) for m in found.values())
        self._blocks = {p: m for p, m in found.items() if owners[id(m)] == 1}
        self._units = {p: model.get_submodule(p) for p in dict.fromkeys(units)}
        self._outputs: list[dict[str, Any]] = []   # per recorded batch: block path -> its output
        self._order: list[str] | None = None       # blocks in the order they returned (None: nothing recorded)
        self._first_call: dict[str, int] = {}      # unit -> blocks returned before its first call
        self._recorded = 0
        self._usable = True

    @contextlib.contextmanager
    def recording(self, batch: int) -> Iterator[None]:
        """Record the blocks' outputs in the forward inside, as those of batch number ``batch`` (0, 1, ...)."""
        if batch != self._recorded:
            raise ValueError(f"record batches in order: expected batch {self._recorded}, got {batch}")
        outputs: dict[str, Any] = {}
        returned: list[str] = []
        first_call: dict[str, int] = {}

        def block_hook(path):
            def record(module, args, out):
                returned.append(path)
                outputs[path] = _clone(out)
            return record

        def unit_hook(path):
            def called(module, args):
                first_call.setdefault(path, len(returned))
            return called

        with forward_hooks([(m, block_hook(p)) for p, m in self._blocks.items()]), \
                forward_hooks([(m, unit_hook(p)) for p, m in self._units.items()], pre=True):
            yield
        self._recorded += 1
        consistent = self._order is None or (returned == self._order and first_call == self._first_call)
        if len(set(returned)) != len(returned) or not consistent:
            self._usable = False   # a block ran twice, or the order changed: replay nothing
            self._outputs.clear()
        if self._usable:
            self._order, self._first_call = returned, first_call
            self._outputs.append(outputs)

    def before(self, units: Iterable[str]) -> list[str]:
        """The recorded blocks that returned before any of ``units`` was called (none if one never was)."""
        if not self._usable or not self._order:
            return []
        firsts = [self._first_call.get(u) for u in units]
        if not firsts or any(f is None for f in firsts):
            return []
        return self._order[:min(firsts)]

    @contextlib.contextmanager
    def replaying(self, batch: int, skip: list[str]) -> Iterator[None]:
        """Inside, each block of ``skip`` returns its recorded output of batch ``batch`` without running."""
        patched = []
        try:
            for path in skip:
                module = self._blocks[path]
                recorded = self._outputs[batch][path]
                patched.append((module, module.__dict__.get("forward")))
                module.forward = lambda *args, _out=recorded, **kwargs: _clone(_out)
            yield
        finally:
            for module, forward in patched:
                if forward is None:
                    del module.forward
                else:
                    module.forward = forward
