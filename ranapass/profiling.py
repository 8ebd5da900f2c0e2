"""``ranapass.profile``: calibrate once, then answer budget questions instantly.

A ``Profile`` holds, for every unit a model could adapt, its candidate configurations with expected
FLOPs and error (``ranapass.candidates``) and the rank-adapter bases. ``Profile.plan(budget)`` runs
an allocation strategy over them (no recalibration), builds the adapters from the model's weights
and, by default, re-fits the thresholds on held-out calibration windows so that measured FLOPs land
on the budget (``ranapass.planning``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ranapass import distributed, storage
from ranapass.attach import temporarily_attached
from ranapass.cache import CacheError, cache_dir, discard, usable_entry
from ranapass.calibrate import RANK_MIN_ASPECT, candidate_linears, collect, shared_linears
from ranapass.candidates import Site, UnitCandidates, calibrated_sites, data_free_sites
from ranapass.cost_model import flops
from ranapass.data import check_token_ids, split_holdout
from ranapass.errors import RanapassError
from ranapass.experts import model_experts
from ranapass.fingerprint import weights_fingerprint
from ranapass.linear_match import linear_modules
from ranapass.loss_calibration import PROBE_KEPT, loss_scales, rescaled
from ranapass.plan import Plan, PlanMismatchError
from ranapass.rewrite_report import EXPERTS_WHY
from ranapass.planning import Planner, PlanOptions
from ranapass.timing import Stopwatch, model_devices, peak_gpu_memory, reset_peak_gpu_memory

__all__ = ["ProfileOptions", "Profile", "profile"]

log = logging.getLogger(__name__)

PROFILE_FORMAT = storage.Format("ranapass.Profile", 2, "profile.json", "profile.safetensors", "profile again")
CALIBRATION_RULES = 3
"""Part of a cached profile's key: raised when the same data and options calibrate differently (a saved
profile stays readable; only the cache stops matching it)."""


@dataclasses.dataclass(frozen=True)
class ProfileOptions:
    """How to calibrate.

    Args:
        batch_size: windows per forward pass.
        sample_tokens: input rows sampled per site for the candidate curves.
        holdout_windows: calibration windows kept out of the statistics, used to fit thresholds (spread over
            the data: ``ranapass.data.split_holdout``).
        error_weighting: "fisher" (output-gradient weighted error, needs a loss) or "relative"
            (each unit's error relative to its output energy).
        gradient_windows: windows of the backward pass for "fisher".
        exclude: module paths never adapted (the output embedding always is).
        rank_min_aspect: offer rank adapters only for units with out >= aspect * in (0: everywhere).
        loss_calibration: rescale every unit's error curve so that it predicts the loss, from probes
            of the held-out windows (``ranapass.loss_calibration``; needs them; one forward pass of them
            per block and per role at each level of ``loss_probe_kept``).
        loss_probe_kept: the kept fractions of the loss-calibration probes; a candidate's scale is
            interpolated between them by its FLOP fraction (docs/quality.md has the ablation behind the default).
        seed: seed of the sampling.
    """

    batch_size: int = 4
    sample_tokens: int = 2048
    holdout_windows: int = 2
    error_weighting: str = "fisher"
    gradient_windows: int = 16
    exclude: tuple[str, ...] = ()
    rank_min_aspect: float = RANK_MIN_ASPECT
    loss_calibration: bool = True
    loss_probe_kept: tuple[float, ...] = PROBE_KEPT
    seed: int = 0

    def __post_init__(self) -> None:
        if self.error_weighting not in ("fisher", "relative"):
            raise RanapassError(f"error_weighting must be 'fisher' or 'relative', got {self.error_weighting!r}")
        for name in ("batch_size", "sample_tokens"):
            if getattr(self, name) < 1:
                raise RanapassError(f"{name} must be positive, got {getattr(self, name)}")
        if self.holdout_windows < 0 or self.gradient_windows < 0:
            raise RanapassError("holdout_windows and gradient_windows must be >= 0")
        object.__setattr__(self, "exclude", tuple(self.exclude))
        kept = tuple(self.loss_probe_kept)
        if not kept or any(isinstance(k, bool) or not isinstance(k, (int, float)) or not 0.0 < k < 1.0 for k in kept):
            raise RanapassError(f"loss_probe_kept must be one or more kept fractions in (0, 1), got {self.loss_probe_kept!r}")
        object.__setattr__(self, "loss_probe_kept", tuple(sorted(set(float(k) for k in kept))))


class Profile:
    """Calibration result for one model: candidate curves per unit, ready for budget queries.

    Holds a reference to the model (plans take the weights from it).
    """

    def __init__(self, model: torch.nn.Module, sites: list[Site], *, holdout: torch.Tensor | None,
                 fingerprint: str, meta: dict[str, Any]):
        self.model = model
        self.sites = sites
        self.holdout = holdout
        self.fingerprint = fingerprint
        self.meta = meta
        self._planner = Planner(model, sites, fingerprint, meta)

    @property
    def units(self) -> list[UnitCandidates]:
        """Every unit (stacked and per-member)."""
        return [u for s in self.sites for u in ([s.stacked] if s.stacked else []) + s.separate]

    def dense_flops(self) -> float:
        """Dense FLOPs per token of the block linears."""
        return self._planner.dense_flops()

    def plan(self, budget: float, *, options: PlanOptions | None = None, **overrides: Any) -> Plan:
        """Allocate under ``budget`` (adapted / dense FLOPs of the block linears) and build the plan.

        Args:
            budget: in (0, 1].
            options: ``PlanOptions`` (allocation, kinds, grouping, fit, count_mask_cost); default: the defaults.
            overrides: any of those fields by name, replacing the value in ``options``.

        Example::

            plan = profile.plan(budget=0.56)
            uniform = profile.plan(0.5, allocation="uniform")
            print(plan.summary())
        """
        return self._planner.plan(budget, PlanOptions.resolve(options, overrides), self.holdout)

    def curve(self, budgets: Sequence[float], *, options: PlanOptions | None = None,
              **overrides: Any) -> list[dict[str, float]]:
        """Predicted error against budget: ``[{budget, expected_ratio, predicted_error}, ...]`` (no fitting).

        Takes the options of ``plan``.
        """
        resolved = PlanOptions.resolve(options, overrides)
        return [self._planner.predict(b, resolved) for b in budgets]

    def save(self, path: str | os.PathLike) -> Path:
        """Write the profile (curves, bases, held-out windows) into directory ``path``."""
        tensors: dict[str, torch.Tensor] = {}
        sites = [site.saved(i, tensors) for i, site in enumerate(self.sites)]
        if self.holdout is not None:
            tensors["holdout"] = self.holdout.contiguous()
        return storage.write(path, PROFILE_FORMAT, {"fingerprint": self.fingerprint, "meta": self.meta,
                                                    "sites": sites}, tensors)

    @classmethod
    def load(cls, path: str | os.PathLike, model: torch.nn.Module, *, check_fingerprint: bool = True) -> Profile:
        """Read a profile written by ``save`` for ``model`` (whose weights must match)."""
        doc, tensors = storage.read(path, PROFILE_FORMAT)
        with storage.parsing(path, PROFILE_FORMAT):
            if check_fingerprint and weights_fingerprint(model) != doc["fingerprint"]:
                raise PlanMismatchError(f"profile {path} was made for other weights: profile this model")
            sites = [Site.from_saved(s, tensors) for s in doc["sites"]]
            return cls(model, sites, holdout=tensors.get("holdout"), fingerprint=doc["fingerprint"],
                       meta=doc["meta"])


def _data_key(data: Any) -> str:
    """A digest of token-window data for the cache key ("" for other data, which is not cached)."""
    h = hashlib.blake2b(digest_size=12)
    if isinstance(data, torch.Tensor):
        h.update(str(tuple(data.shape)).encode())
        h.update(data.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()
    return ""


def profile(model: torch.nn.Module, data: Any = None, *, options: ProfileOptions | None = None,
            loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor] | None = None,
            under: Plan | None = None, cache: bool | str | os.PathLike = True, refresh: bool = False) -> Profile:
    """Calibrate ``model`` once: statistics, decompositions and candidate curves of every linear.

    Args:
        model: an HF causal LM or any ``nn.Module`` with linears (``nn.Linear``, ``Conv1D``; not modified).
        data: calibration token windows ``[N, L]`` (see ``ranapass.data``), an iterable of model
            inputs, or None for data-free profiling (static low rank from the weights' spectra).
        options: ``ProfileOptions``.
        loss_fn: ``loss_fn(model, batch) -> summed loss`` for Fisher weights on non-LM models.
        under: sequential calibration: collect every statistic while this plan runs eagerly, so each
            unit is calibrated on the inputs the *adapted* upstream layers give it (re-plan from the
            result at the same budget). Not cached.
        cache: True to reuse/store the profile under the ranapass cache (token-window data only),
            a directory to use instead, or False. A damaged cache entry is reported, discarded and rebuilt.
        refresh: recalibrate even when the cache holds the profile, and replace the entry (best effort:
            an unusable cache folder is then skipped with one log line).

    Example::

        model, tok = ranapass.models.load_model()
        windows = ranapass.data.calibration_windows(tok)
        profile = ranapass.profile(model, windows)
        plan = profile.plan(budget=0.56)
    """
    options = options or ProfileOptions()
    check_token_ids(data, model, "calibration windows")
    model.eval()
    fingerprint = weights_fingerprint(model)
    if distributed.world_size() > 1:
        distributed.check_agreement({"model weights' fingerprint": fingerprint, "calibration data": _data_key(data),
                                     "profile options": json.dumps(dataclasses.asdict(options))})
    linears = candidate_linears(model, options.exclude)
    key = None
    if cache and under is None and (data is None or isinstance(data, torch.Tensor)):
        key = hashlib.blake2b((fingerprint + _data_key(data) + json.dumps(dataclasses.asdict(options)) +
                               f"v{PROFILE_FORMAT.version}.{CALIBRATION_RULES}").encode(),
                              digest_size=12).hexdigest()
        try:
            folder = (Path(cache) if not isinstance(cache, bool) else cache_dir("profiles")) / key
        except CacheError as e:
            if not refresh:
                raise
            log.warning("not caching the profile: %s", e)
            key = None
        if key is not None and not refresh:
            cached = None
            if usable_entry(folder):
                try:
                    cached = Profile.load(folder, model, check_fingerprint=False)
                except RanapassError as e:
                    discard(folder, e)
            if distributed.everyone(cached is not None):  # every process reuses it, or none does
                log.info("loaded cached profile %s", folder)
                return cached

    t0 = time.perf_counter()
    devices = model_devices(model)
    reset_peak_gpu_memory(devices)
    stopwatch = Stopwatch(devices)
    if data is None:
        if under is not None:
            raise RanapassError("sequential calibration (under=plan) needs calibration data")
        with stopwatch.stage("candidates"):
            sites = data_free_sites(linears)
        holdout, meta = None, {"data": "none (weights' spectra)"}
    elif under is not None:
        with temporarily_attached(model, under):
            sites, holdout, meta = _profile_with_data(model, data, linears, options, loss_fn, stopwatch)
        meta["calibrated_under"] = f"plan at budget {under.budget} ({under.allocation})"
    else:
        sites, holdout, meta = _profile_with_data(model, data, linears, options, loss_fn, stopwatch)
    if data is not None:  # on the plain model, also after calibrating under a plan
        meta["loss_calibration"] = _calibrate_to_loss(model, sites, holdout, options, stopwatch)
    meta.update({"model": type(model).__name__, "profile_seconds": round(time.perf_counter() - t0, 1),
                 "timings": stopwatch.rounded(), "peak_gpu_memory_bytes": peak_gpu_memory(devices),
                 "devices": [str(d) for d in devices], "options": dataclasses.asdict(options),
                 "left_dense": left_dense(model)})
    for note in meta["left_dense"]:
        log.warning("left dense: %s: %s (%s)", note["what"], note["reason"], ", ".join(note["paths"][:4]))
    result = Profile(model, sites, holdout=holdout, fingerprint=fingerprint, meta=meta)
    log.info("profiled %d units over %d sites in %.1fs", len(result.units), len(sites), meta["profile_seconds"])
    if key is not None and distributed.is_main():
        result.save(folder)  # replaces a damaged or stale entry file by file, the manifest last
    return result


def _calibrate_to_loss(model, sites: list[Site], holdout: torch.Tensor | None, options: ProfileOptions,
                       stopwatch: Stopwatch) -> dict[str, Any] | str:
    """Rescale ``sites``' curves in place by their loss scales (``ranapass.loss_calibration``); the facts, or
    why not. The probes compare next-token distributions: a language model's (one with a ``config``)."""
    if not options.loss_calibration:
        return "off"
    if holdout is None:
        return "skipped: no held-out windows"
    if not hasattr(model, "config"):
        return f"skipped: {type(model).__name__} is not a language model (the probes compare next-token logits)"
    with stopwatch.stage("loss_calibration"):
        scales, facts = loss_scales(model, sites, holdout, options.batch_size, options.loss_probe_kept)
        sites[:] = rescaled(sites, scales)
    return facts


def left_dense(model: torch.nn.Module) -> list[dict[str, Any]]:
    """What a plan leaves dense besides the output embedding and ``exclude``, with dense FLOPs per token:
    linears whose weight is tied to another module's, and 3D expert weights (``Plan.summary`` prints them)."""
    notes = []
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = linear_modules(model)
    tied = [p for p in shared_linears(model) if linears[p].module is not out_emb]
    if tied:
        cost = sum(flops.per_token(flops.dense_linear(linears[p].out_features, linears[p].in_features)) for p in tied)
        notes.append({"what": f"{len(tied)} linear(s) with a tied weight", "paths": tied, "flops": cost,
                      "reason": "the weight is also a parameter of another module; an adapter would replace one "
                                "use of it only"})
    experts = model_experts(model)
    if experts:
        notes.append({"what": f"{len(experts)} expert parameter(s)", "paths": list(experts),
                      "flops": sum(experts.values()), "reason": EXPERTS_WHY})
    return notes


def _profile_with_data(model, data, linears, options: ProfileOptions, loss_fn, stopwatch: Stopwatch):
    """Calibrate on ``data`` (less the held-out windows): the sites with candidates, the holdout, facts."""
    holdout = None
    if isinstance(data, torch.Tensor):
        if data.dim() != 2:
            raise RanapassError(f"token windows must be [N, L], got shape {tuple(data.shape)}")
        data, holdout = split_holdout(data, options.holdout_windows)
        grad_data = data[: options.gradient_windows] if options.error_weighting == "fisher" else None
    else:
        data = list(data)
        grad_data = data[: options.gradient_windows] if options.error_weighting == "fisher" else None
    if options.error_weighting == "fisher" and loss_fn is None and not hasattr(model, "config"):
        log.warning("no loss for Fisher weights on %s: using relative error weighting", type(model).__name__)
        grad_data = None
    stats = collect(model, data, linears=linears, batch_size=options.batch_size,
                    sample_tokens=options.sample_tokens, rank_min_aspect=options.rank_min_aspect,
                    gradient_data=grad_data, loss_fn=loss_fn, seed=options.seed, stopwatch=stopwatch)
    # Each process builds the candidates of its share of the sites; every process gets them all.
    mine = distributed.shard(stats.sites)
    with stopwatch.stage("candidates"):
        built = calibrated_sites(dataclasses.replace(stats, sites=[s for _, s in mine]), linears,
                                 options.error_weighting, options.rank_min_aspect, stopwatch)
    sites = distributed.gather_ordered([(i, site) for (i, _), site in zip(mine, built)], "candidates")
    meta = {"data": f"{stats.windows} windows, {stats.tokens} tokens",
            "error_weighting": "fisher" if stats.grad_sq else "relative"}
    if distributed.world_size() > 1:
        meta["processes"] = distributed.world_size()
    return sites, holdout, meta
