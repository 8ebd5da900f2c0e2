"""Truncate each module of a LoRA adapter to the rank an allocation method gives it, within a cost budget.

Candidates are ranks 0..t per module, each costing ``k`` x its cost per rank (parameters, or FLOPs per
token) and discarding the energy beyond the k largest singular values of its spectrum
(:mod:`ranapass.lora.spectrum`). Allocation methods (:data:`RANK_METHODS`):

- ``"global"``: ranapass's allocator (:func:`ranapass.cost_model.allocate.allocate`) minimises the total
  discarded energy, each module's divided by the norm its error kind gives (:data:`ERROR_MEASURES`), under the
  budget: it pays for each rank what it costs.
- ``"threshold"``: PARA (arXiv 2604.27796): pool the singular values of all modules and keep the largest
  until the budget is spent, one global threshold. It ignores that a rank of a wide module costs more.
- ``"uniform"``: the same fraction of every module's rank, rounded down (so it may keep less than the
  budget when keep x rank is not whole); the baseline.

A new method is an allocator ``(RankProblem) -> ranks`` and a sentence saying why a keep left no rank.
Modules left at rank 0 are dropped from the written adapter (its ``target_modules`` lists the kept ones).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

from tqdm import tqdm

from ranapass.cost_model.allocate import Candidate, Choice, allocate
from ranapass.errors import RanapassError
from ranapass.lora.calibration import LoraCalibration, check_calibration
from ranapass.lora.io import LoraAdapter, LoraFactors, Target, compressed_config, load_lora
from ranapass.lora.report import LoraCompression, ModuleRanks
from ranapass.lora.spectrum import LoraSpectrum, module_spectrum

if TYPE_CHECKING:
    from peft import PeftModel

__all__ = ["CALIBRATED_ERRORS", "ERRORS", "ERROR_MEASURES", "METHODS", "RANK_METHODS", "TARGETS", "ErrorMeasure",
           "RankMethod", "RankProblem", "compress_lora"]

log = logging.getLogger(__name__)

Method = Literal["global", "threshold", "uniform"]
ErrorKind = Literal["energy", "relative", "output", "fisher"]
TARGETS = ("params", "flops")


@dataclasses.dataclass(frozen=True)
class RankProblem:
    """What an allocation method chooses ranks from.

    Args:
        modules: the adapter's modules.
        spectra: each module's spectrum under ``error``.
        costs: each module's cost per rank, in the target's unit.
        keep: the share of ``total_cost`` the ranks may cost.
        total_cost: the adapter's cost, Σ rank x cost per rank.
        target: the cost's unit (``"params"`` or ``"flops"``).
        error: the error kind the spectra measure.
        calibration: the statistics of a calibrated error, else None.
    """

    modules: Sequence[LoraFactors]
    spectra: Sequence[LoraSpectrum]
    costs: Sequence[int]
    keep: float
    total_cost: float
    target: str
    error: str
    calibration: LoraCalibration | None

    @property
    def budget(self) -> float:
        return self.keep * self.total_cost


@dataclasses.dataclass(frozen=True)
class ErrorMeasure:
    """An error kind: whether it needs a calibration, and what divides each module's discarded energy before
    the global allocation adds them.

    Args:
        calibrated: needs a :class:`LoraCalibration` (its spectra are whitened, :func:`module_spectrum`).
        norms: per module, the divisor of its discarded energy.
    """

    calibrated: bool
    norms: Callable[[RankProblem], list[float]]


@dataclasses.dataclass(frozen=True)
class RankMethod:
    """An allocation method: ``allocate`` gives each module's rank; ``nothing_kept`` says why none was kept."""

    allocate: Callable[[RankProblem], list[int]]
    nothing_kept: Callable[[RankProblem], str]


def _unit_norms(problem: RankProblem) -> list[float]:
    """Energy as it is: ‖ΔW‖² summed; or, for fisher, nats of loss already additive across modules."""
    return [1.0] * len(problem.modules)


def _own_energy(problem: RankProblem) -> list[float]:
    """Each module's discarded share of its own energy."""
    return [spec.total_energy or 1.0 for spec in problem.spectra]


def _base_output_energy(problem: RankProblem) -> list[float]:
    """The base layer's output energy ``E‖W x‖²``, a scale the loss does not see."""
    return [problem.calibration.output_energy[f.name] for f in problem.modules]


ERROR_MEASURES: dict[str, ErrorMeasure] = {
    "energy": ErrorMeasure(calibrated=False, norms=_unit_norms),
    "relative": ErrorMeasure(calibrated=False, norms=_own_energy),
    "output": ErrorMeasure(calibrated=True, norms=_base_output_energy),
    "fisher": ErrorMeasure(calibrated=True, norms=_unit_norms),
}
ERRORS = tuple(ERROR_MEASURES)
CALIBRATED_ERRORS = tuple(name for name, kind in ERROR_MEASURES.items() if kind.calibrated)


def _allocate_global(problem: RankProblem) -> list[int]:
    """The allocator over ranks 0..t per module, error = discarded energy / the module's norm."""
    norms = ERROR_MEASURES[problem.error].norms(problem)
    units = [Choice.simple([Candidate(k * c, e / norm) for k, e in enumerate(spec.tail_energy())])
             for spec, c, norm in zip(problem.spectra, problem.costs, norms)]
    return [choice[0] for choice in allocate(units, problem.budget).choice]


def _allocate_threshold(problem: RankProblem) -> list[int]:
    """PARA: the largest singular values of the whole network first, until the next one would not fit."""
    pooled = sorted(((float(v), i) for i, spec in enumerate(problem.spectra) for v in spec.values), reverse=True)
    ranks, spent = [0] * len(problem.spectra), 0.0
    for value, i in pooled:
        if value <= 0 or spent + problem.costs[i] > problem.budget:
            break
        ranks[i] += 1
        spent += problem.costs[i]
    return ranks


def _allocate_uniform(problem: RankProblem) -> list[int]:
    """floor(keep x rank) per module (the 1e-9 absorbs keep x rank landing just below a whole number)."""
    return [min(math.floor(problem.keep * f.rank + 1e-9), len(s.values))
            for f, s in zip(problem.modules, problem.spectra)]


def _cheapest_rank(problem: RankProblem) -> str:
    return f"the cheapest rank costs {min(problem.costs)} {problem.target} of {problem.total_cost:,.0f}"


def _uniform_floor(problem: RankProblem) -> str:
    top = max(f.rank for f in problem.modules)
    return f"uniform keeps floor(keep x rank) ranks per module: keep must be at least 1/{top}"


RANK_METHODS: dict[str, RankMethod] = {
    "global": RankMethod(_allocate_global, _cheapest_rank),
    "threshold": RankMethod(_allocate_threshold, _cheapest_rank),
    "uniform": RankMethod(_allocate_uniform, _uniform_floor),
}
METHODS = tuple(RANK_METHODS)


def compress_lora(
    adapter: LoraAdapter | str | os.PathLike | PeftModel,
    keep: float = 0.25,
    *,
    method: Method = "global",
    target: Target = "params",
    error: ErrorKind = "energy",
    calibration: LoraCalibration | None = None,
) -> LoraCompression:
    """Truncate each module of a LoRA adapter to the rank an allocation gives it, within ``keep`` of its cost.

    Args:
        adapter: a :class:`LoraAdapter`, an adapter folder or a ``PeftModel`` (read with :func:`load_lora`).
        keep: fraction of the adapter's cost to keep, in (0, 1].
        method: ``"global"`` (ranapass allocator), ``"threshold"`` (PARA's global threshold) or ``"uniform"``.
        target: cost counted by the budget: ``"params"`` (LoRA parameters) or ``"flops"`` (per token).
        error: what is measured and, by ``"global"``, minimised: ``"energy"`` (Σ discarded s², i.e.
            ‖ΔW - ΔW'‖²_F summed over modules), ``"relative"`` (each module's discarded share of its own
            energy), ``"output"`` (needs ``calibration``: the expected output error ``E‖(ΔW - ΔW')x‖²``,
            relative to the base layer's ``E‖W x‖²``; the truncation then minimises it too) or ``"fisher"``
            (needs a ``calibration`` with gradients: the second-order loss change ``½ ‖G^½ (ΔW - ΔW')L‖²_F``,
            in nats, summed over modules as it is; the truncation minimises it too, and half the discarded
            energy predicts the loss change, :attr:`LoraCompression.predicted_loss_change`).
        calibration: statistics from :func:`calibrate_lora`, for ``error="output"`` or ``"fisher"``.

    Returns:
        The compressed adapter and a per-module report; the input is not changed.

    Example::

        result = ranapass.compress_lora("my-adapter", keep=0.25)
        print(result.summary())
        result.adapter.save("my-adapter-25")   # PeftModel.from_pretrained(base, "my-adapter-25")
    """
    _check_arguments(keep, method, target, error, calibration)
    if not isinstance(adapter, LoraAdapter):
        adapter = load_lora(adapter)
    modules = adapter.modules
    if calibration is not None:
        check_calibration(calibration, modules, error)
    spectra = [module_spectrum(f, calibration, error)
               for f in tqdm(modules, desc="LoRA spectra", unit="module", disable=None)]
    costs = [f.cost_per_rank(target) for f in modules]
    problem = RankProblem(modules, spectra, costs, keep, float(sum(f.rank * c for f, c in zip(modules, costs))),
                          target, error, calibration)
    rank_method = RANK_METHODS[method]
    ranks = rank_method.allocate(problem)
    if not any(ranks):
        raise RanapassError(f"keep={keep} leaves no rank in any module: {rank_method.nothing_kept(problem)}; "
                            "raise keep")
    compressed, rows = _truncate(adapter, spectra, ranks)
    cost_after = float(sum(k * c for k, c in zip(ranks, costs)))
    log.info("LoRA %s: kept %d of %d modules, %.2f%% of %s", method, len(compressed.modules), len(modules),
             100 * cost_after / problem.total_cost, target)
    return LoraCompression(compressed, rows, method, target, keep, error, problem.total_cost, cost_after)


def _check_arguments(keep: float, method: str, target: str, error: str, calibration: LoraCalibration | None) -> None:
    if not 0 < keep <= 1:
        raise RanapassError(f"keep must be in (0, 1], got {keep}")
    for value, allowed, what in ((method, RANK_METHODS, "method"), (target, TARGETS, "target"),
                                 (error, ERROR_MEASURES, "error")):
        if value not in allowed:
            raise RanapassError(f"{what} must be one of {', '.join(allowed)}; got {value!r}")
    if ERROR_MEASURES[error].calibrated != (calibration is not None):
        raise RanapassError(f"error='output' or 'fisher' needs a calibration (calibrate_lora), and a calibration "
                            f"is only used by those (got error={error!r})")


def _truncate(adapter: LoraAdapter, spectra: Sequence[LoraSpectrum],
              ranks: Sequence[int]) -> tuple[LoraAdapter, list[ModuleRanks]]:
    """The adapter keeping ``ranks[i]`` ranks of module i (scale folded in; rank 0 drops it) and its report rows."""
    modules, rows, kept = [], [], {}
    for f, spec, k in zip(adapter.modules, spectra, ranks):
        total = spec.total_energy
        rows.append(ModuleRanks(f.name, f.shape, f.rank, k, total, spec.energy(k) / total if total > 0 else 1.0))
        if k == 0:
            continue
        b, a = spec.factors(k)
        modules.append(dataclasses.replace(f, A=a.to(f.A.dtype), B=b.to(f.B.dtype), scale=1.0))
        kept[f.name] = k
    # A dropped module is no longer wrapped by PEFT: tensors saved under it (an embedding's base_layer) go too.
    dropped = tuple(f"{f.key}." for f, k in zip(adapter.modules, ranks) if k == 0)
    extra = {k: v for k, v in adapter.extra.items() if not k.startswith(dropped)} if dropped else dict(adapter.extra)
    if len(extra) < len(adapter.extra):
        log.warning("dropped %d tensors saved under modules left at rank 0: %s", len(adapter.extra) - len(extra),
                    sorted(set(adapter.extra) - set(extra)))
    return LoraAdapter(compressed_config(adapter.config, kept, dropped=bool(dropped)), modules, extra), rows
