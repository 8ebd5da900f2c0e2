"""TEAL's block-wise greedy allocation (Liu et al., 2024): input sparsity spread over a block's projections.

Like TEAL-style in :mod:`ranapass.baselines` every projection keeps the inputs with ``|x_j| >= t``, ``t`` a
quantile of the dense model's ``|x|`` on calibration text, but each projection of a block (q, k, v, o,
gate, up, down in a Llama) gets its own sparsity. Inside each block, starting from all dense:

- every step tries raising each projection's sparsity by ``step / w_p``, with ``w_p`` the projection's share
  of the block's parameters, so that each try raises the block's *effective* sparsity
  ``sum_p w_p s_p`` (its FLOP saving before mask costs) by ``step``;
- it keeps the raise whose block output, on the dense block inputs of calibration windows, is closest to
  the dense block output (squared error over the last ``last_fraction`` of each window's tokens, relative
  to the output's energy; TEAL averages per-channel norms over those tokens instead);
- and records the state, until the effective sparsity reaches ``max_sparsity``.

Every block follows its own path to the same target: ``plan_at(s)`` reads each block's path at effective
sparsity ``s`` (interpolated within a step), and ``plan(budget)`` searches ``s`` so that the FLOP ratio
measured on held-out windows meets the budget, as for the uniform baselines. Projections that share an input
(q/k/v, gate/up) are separate neuron adapters, each with its own mask, and pay for it in measured FLOPs.
Beyond ``max_sparsity`` a path goes straight to sparsity 1 everywhere (logged, marked in the plan's meta).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from typing import Any

import numpy as np
import torch

from ranapass.adapters import NeuronAdapterSpec
from ranapass.baselines import SparsityBaseline, teal
from ranapass.calibrate import candidate_linears, run_model
from ranapass.data import split_holdout
from ranapass.errors import RanapassError
from ranapass.hooks import forward_hooks
from ranapass.linear_match import LinearModule
from ranapass.plan import Plan, UnitPlan

__all__ = ["GreedyPath", "GreedySparsityBaseline", "Projection", "teal_greedy", "transformer_blocks"]

log = logging.getLogger(__name__)

CACHE_ARGUMENTS = ("past_key_values", "past_key_value", "layer_past")
"""Keyword arguments of HF blocks that carry a KV cache: a block run twice on one would attend to both runs."""


@dataclasses.dataclass(frozen=True)
class Projection:
    """One linear of a block and its dense input's quantiles (``quantiles.threshold(s)`` is its cutoff at ``s``)."""

    path: str
    block: str
    in_features: int
    out_features: int
    quantiles: Any

    @property
    def params(self) -> int:
        return self.in_features * self.out_features


@dataclasses.dataclass(frozen=True)
class GreedyPath:
    """One block's greedy path: after step i the projections' sparsities are ``states[i]``.

    ``weights`` are the projections' parameter shares (summing to 1), ``errors[i]`` the relative block-output
    error at ``states[i]`` and ``uniform_errors[i]`` the error with every projection at the same effective
    sparsity ``effective[i]`` (TEAL's "baseline error").
    """

    projections: tuple[str, ...]
    weights: np.ndarray
    states: np.ndarray
    errors: np.ndarray
    uniform_errors: np.ndarray

    @property
    def effective(self) -> np.ndarray:
        return self.states @ self.weights

    def at(self, sparsity: float) -> np.ndarray:
        """Per-projection sparsities at effective sparsity ``sparsity``: the path, then straight on to all ones."""
        eff = self.effective
        if sparsity >= eff[-1]:
            last = self.states[-1]
            frac = 0.0 if eff[-1] >= 1.0 else (sparsity - eff[-1]) / (1.0 - eff[-1])
            return last + min(frac, 1.0) * (1.0 - last)
        i = int(np.searchsorted(eff, sparsity, side="right"))
        lo, hi = eff[i - 1], eff[i]
        frac = (sparsity - lo) / (hi - lo)
        return self.states[i - 1] + frac * (self.states[i] - self.states[i - 1])


def transformer_blocks(model: torch.nn.Module, paths: list[str]) -> dict[str, list[str]]:
    """Group linear paths by the repeated block holding them: the item of an ``nn.ModuleList`` on the path.

    Raises:
        RanapassError: a linear lies in no ``nn.ModuleList`` item (greedy allocation works per block).
    """
    blocks: dict[str, list[str]] = {}
    for path in paths:
        parts, module, block = path.split("."), model, None
        for i, part in enumerate(parts[:-1]):
            if isinstance(module, torch.nn.ModuleList) and part.isdigit():
                block = ".".join(parts[:i + 1])
                break
            module = getattr(module, part)
        if block is None:
            raise RanapassError(f"{path} is in no repeated block (an nn.ModuleList item): the greedy allocation "
                                "spreads sparsity inside blocks; use ranapass.baselines.teal (uniform) instead")
        blocks.setdefault(block, []).append(path)
    return blocks


def _first_tensor(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


@torch.no_grad()
def _block_io(model: torch.nn.Module, blocks: list[str], windows: torch.Tensor, batch_size: int,
              ) -> dict[str, list[tuple[tuple, dict, torch.Tensor]]]:
    """Each block's dense call arguments and output, one entry per batch of windows."""
    modules = dict(model.named_modules())
    found: dict[str, list] = {b: [] for b in blocks}

    def record(name):
        def hook(module, args, kwargs, output):
            if any(kwargs.get(k) is not None for k in CACHE_ARGUMENTS):
                raise RanapassError(f"{name} was called with a KV cache: the greedy allocation runs each block "
                                    "again on its recorded inputs, which a cache would change")
            found[name].append((args, kwargs, _first_tensor(output).detach()))
        return hook

    keyword = "use_cache" in inspect.signature(model.forward).parameters
    with forward_hooks([(modules[b], record(b)) for b in blocks], with_kwargs=True):
        for batch in windows.split(batch_size):
            batch = batch.to(next(model.parameters()).device)
            if keyword and not batch.is_floating_point():
                model(input_ids=batch, use_cache=False)
            else:
                run_model(model, batch)
    return found


class _BlockRunner:
    """Runs one block on its recorded dense inputs with the projections' inputs masked at given sparsities."""

    def __init__(self, block: torch.nn.Module, io: list, projections: list[Projection],
                 linears: dict[str, LinearModule], last_fraction: float):
        self.block, self.io, self.projections, self.linears = block, io, projections, linears
        self.last_fraction = last_fraction
        self.cutoffs = {p.path: 0.0 for p in projections}

    def _mask(self, path: str):
        def pre(module, args):
            x = args[0]
            return (x * (x.float().abs() >= self.cutoffs[path]).to(x.dtype), *args[1:])
        return pre

    @torch.no_grad()
    def error(self, sparsities: np.ndarray) -> float:
        """Squared error of the block output against dense on the last tokens, over the dense output's energy."""
        for p, s in zip(self.projections, sparsities, strict=True):
            self.cutoffs[p.path] = p.quantiles.threshold(float(s))
        num = den = 0.0
        with forward_hooks([(self.linears[p.path].module, self._mask(p.path)) for p in self.projections], pre=True):
            for args, kwargs, target in self.io:
                out = _first_tensor(self.block(*args, **kwargs))
                start = int(out.shape[1] * (1.0 - self.last_fraction))
                target = target[:, start:].float()
                num += float((out[:, start:].float() - target).square().sum())
                den += float(target.square().sum())
        return num / max(den, 1e-30)


def _greedy_path(runner: _BlockRunner, step: float, max_sparsity: float) -> GreedyPath:
    projections = runner.projections
    params = np.array([p.params for p in projections], dtype=np.float64)
    weights = params / params.sum()
    state = np.zeros(len(projections))
    states, errors, uniform = [state], [runner.error(state)], [runner.error(state)]
    while state @ weights < max_sparsity - 1e-9 and (state < 1.0).any():
        best_error, best = np.inf, None
        for i in np.flatnonzero(state < 1.0):
            trial = state.copy()
            trial[i] = min(1.0, state[i] + step / weights[i])
            err = runner.error(trial)
            if err < best_error:
                best_error, best = err, trial
        state = best
        states.append(state)
        errors.append(best_error)
        uniform.append(runner.error(np.full(len(projections), float(state @ weights))))
    return GreedyPath(tuple(p.path for p in projections), weights, np.stack(states), np.array(errors),
                      np.array(uniform))


class GreedySparsityBaseline(SparsityBaseline):
    """TEAL-style input sparsity allocated per block by TEAL's greedy search; build one with :func:`teal_greedy`.

    ``paths[block]`` is each block's :class:`GreedyPath`; ``plan_at(s)`` is the plan at effective block
    sparsity ``s`` (every block at the same ``s``) and ``plan(budget)`` meets a measured FLOP budget.
    """

    def __init__(self, model: torch.nn.Module, projections: list[Projection], paths: dict[str, GreedyPath],
                 dense: list[UnitPlan], holdout: torch.Tensor | None, meta: dict[str, Any]):
        super().__init__(model, "teal-greedy", [], dense, holdout, meta)
        self.projections = projections
        self.paths = paths

    def sparsities(self, sparsity: float) -> dict[str, float]:
        """Each projection's sparsity at effective block sparsity ``sparsity``."""
        out: dict[str, float] = {}
        for path in self.paths.values():
            out.update(zip(path.projections, (float(s) for s in path.at(sparsity)), strict=True))
        return out

    def plan_at(self, sparsity: float) -> Plan:
        """The plan at effective sparsity ``sparsity`` in every block, read from the blocks' greedy paths."""
        if not 0.0 <= sparsity <= 1.0:
            raise ValueError(f"sparsity must be in [0, 1], got {sparsity!r}")
        per = self.sparsities(sparsity)
        beyond = sparsity > self.meta["max_sparsity"] + 1e-9
        if beyond:
            log.info("teal-greedy: sparsity %.4f is beyond the greedy paths (up to %.3f); going on straight to 1",
                     sparsity, self.meta["max_sparsity"])
        units = list(self.dense)
        for p in self.projections:
            s = per[p.path]
            tau = p.quantiles.threshold(s)
            spec = NeuronAdapterSpec((p.path,), (p.out_features,), p.in_features, tau, weighted=False,
                                     thresholds=torch.full((p.in_features,), tau, dtype=torch.float32))
            units.append(UnitPlan(p.path, (p.path,), (p.out_features,), p.in_features, spec,
                                  (1.0 - s) * p.in_features))
        order = {m: i for i, m in enumerate(self.meta["linear_order"])}
        units.sort(key=lambda u: order[u.members[0]])
        meta = {k: v for k, v in self.meta.items() if k != "linear_order"}
        return Plan(units, 1.0, self.method, self.fingerprint,
                    {**meta, "sparsity": sparsity, "beyond_greedy_paths": beyond, "projection_sparsity": per})


def teal_greedy(model: torch.nn.Module, windows: torch.Tensor, *, holdout_windows: int = 4,
                sample_tokens: int = 4096, batch_size: int = 4, greedy_windows: int = 4, step: float = 0.005,
                max_sparsity: float = 0.9, last_fraction: float = 0.25) -> GreedySparsityBaseline:
    """TEAL-style input sparsity with TEAL's greedy per-block allocation over each block's projections.

    Args:
        model: an HF causal LM whose linears sit in repeated blocks (not modified).
        windows: calibration token windows ``[N, L]``; ``holdout_windows`` of them are kept out (``plan``
            measures FLOPs on them), the quantiles come from the rest, the greedy search from the first
            ``greedy_windows``.
        sample_tokens: input rows sampled per site for the quantiles.
        step: effective block sparsity added per greedy step (TEAL's Llama steps come to about 0.004).
        max_sparsity: effective sparsity where the search stops (each block costs about
            ``8 * max_sparsity / step`` block forwards on the greedy windows).
        last_fraction: the fraction of each window's last tokens that the block-output error reads.

    Example::

        baseline = ranapass.baselines_greedy.teal_greedy(model, ranapass.calibration_windows(tok, num_windows=16))
        plan = baseline.plan(0.7)
    """
    if not 0.0 < step <= 1.0 or not 0.0 < max_sparsity <= 1.0 or not 0.0 < last_fraction <= 1.0:
        raise RanapassError(f"step, max_sparsity and last_fraction must be in (0, 1], got {step}, {max_sparsity}, "
                            f"{last_fraction}")
    if greedy_windows < 1:
        raise RanapassError(f"greedy_windows must be at least 1, got {greedy_windows}")
    uniform = teal(model, windows, holdout_windows=holdout_windows, sample_tokens=sample_tokens,
                   batch_size=batch_size)
    linears = candidate_linears(model)
    sites = [(m, o, u) for u in uniform.units for m, o in zip(u.members, u.out_features, strict=True)]
    blocks = transformer_blocks(model, [m for m, _, _ in sites])
    block_of = {p: b for b, paths in blocks.items() for p in paths}
    projections = [Projection(m, block_of[m], linears[m].in_features, o, u.quantiles) for m, o, u in sites]
    greedy_data = split_holdout(windows, holdout_windows)[0][:greedy_windows]
    io = _block_io(model, list(blocks), greedy_data, batch_size)
    modules = dict(model.named_modules())
    paths = {}
    for block in blocks:
        members = [p for p in projections if p.block == block]
        runner = _BlockRunner(modules[block], io.pop(block), members, linears, last_fraction)
        paths[block] = _greedy_path(runner, step, max_sparsity)
        log.info("teal-greedy %s: %d steps, error at %.2f: %.4g (uniform %.4g)", block, len(paths[block].states) - 1,
                 paths[block].effective[-1], paths[block].errors[-1], paths[block].uniform_errors[-1])
    meta = {**uniform.meta,
            "method": "TEAL-style with TEAL's greedy allocation: neuron adapters on every projection, score |x|, "
                      "per-projection sparsity from a greedy search on block-output error, the same effective "
                      "sparsity in every block",
            "greedy": f"{len(greedy_data)} windows, step {step}, up to {max_sparsity}, error on the last "
                      f"{last_fraction:g} of the tokens",
            "max_sparsity": max_sparsity}
    return GreedySparsityBaseline(model, projections, paths, uniform.dense, uniform.holdout, meta)
