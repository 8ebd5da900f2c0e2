"""Calibration: one pass over calibration data collecting, per linear input, what allocation needs.

Forward pre-hooks on every candidate linear (``nn.Linear``, ``Conv1D``) see its input. Linears that receive the *same
tensor object* in a forward (q/k/v, gate/up) share an input *site*; each site accumulates:

- the input Gram matrix ``sum x x^T`` (float64), for the data-aware decomposition;
- a small random sample of its input rows, for the candidate curves (cost_model/curves.py);
- the token count, and a finite check (NaN/inf activations are an error, not a statistic).

An optional second pass runs backward through the language-model loss and accumulates, per linear:

- the squared gradient of its output per channel (Fisher weights that make errors comparable across
  layers);
- the first-order loss change of dropping its small inputs at each neuron-adapter threshold
  (``cost_model.curves.neuron_thresholds`` on the site's sample): ``-sum_j h_j x_j`` over the dropped
  inputs j, with ``h`` the gradient of the loss w.r.t. the linear's input through this linear alone.
  The loss calibration measures KL, which has no first-order term; this is the signed part that
  mild input sparsity can have (docs/quality.md). With it, its standard error across the gradient
  windows (``ranapass.candidates`` shrinks each term by it).

Nothing is stored per token beyond the sample, so memory stays bounded.

Every statistic stays on the device of the linear it describes (no copy to the host per batch). Only
the sampled row indices come from a CPU generator, so the sample depends on the seed alone, whatever
the device. Under a ``torch.distributed`` process group each process runs its shard of the batches and
the statistics are combined at the end (``ranapass.distributed``). The rows sampled from a batch depend
only on the seed and the batch's global index, so any number of processes gives the same statistics.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from tqdm.auto import tqdm

from ranapass import distributed
from ranapass.cost_model.curves import neuron_thresholds
from ranapass.errors import RanapassError
from ranapass.hooks import forward_hooks
from ranapass.linear_match import LinearModule, linear_modules
from ranapass.offload import execution_device, onloaded
from ranapass.timing import Stopwatch

__all__ = ["SiteStats", "CalibrationStats", "candidate_linears", "shared_linears", "collect", "run_model"]

log = logging.getLogger(__name__)

RANK_MIN_ASPECT = 0.5
"""Default of ``ProfileOptions.rank_min_aspect``: rank adapters are only considered when
out >= aspect * in (for some stacking of the site). Below that the always-paid B product (2 n nB)
leaves little room under the dense cost (down projections), and skipping the site's Gram matrix
(the costliest statistic) saves most of the calibration time."""


@dataclasses.dataclass
class SiteStats:
    """Statistics of one input read by one or more linears (members, in call order).

    ``gram`` is float64 on the members' device; ``samples`` are rows of the input in its own dtype
    (a bfloat16 model's rows are kept exactly, at half the memory of float32).
    """

    members: list[str]
    in_features: int
    out_features: list[int]
    gram: torch.Tensor | None
    tokens: int = 0
    samples: list[torch.Tensor] = dataclasses.field(default_factory=list)

    @property
    def sample(self) -> torch.Tensor:
        """The sampled input rows, ``[rows, in_features]`` float32 on the statistics' device."""
        return torch.cat(self.samples).float() if self.samples else torch.empty(0, self.in_features)

    def release(self) -> None:
        """Free the Gram matrix and the sample (once the site's candidates are built)."""
        self.gram = None
        self.samples = []

    @property
    def needs_gram(self) -> bool:
        return self.gram is not None


@dataclasses.dataclass
class CalibrationStats:
    """Everything one calibration pass produced."""

    sites: list[SiteStats]
    grad_sq: dict[str, torch.Tensor]   # member path -> mean squared output gradient per channel (float64)
    windows: int
    tokens: int
    # member path -> mean first-order loss change per token at each of its neuron thresholds (float64)
    first_order: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    # member path -> the standard error of each first-order term across the gradient windows (float64; NaN
    # with fewer than 2 windows)
    first_order_se: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


def candidate_linears(model: torch.nn.Module, exclude: tuple[str, ...] = ()) -> dict[str, LinearModule]:
    """The linears ranapass may adapt: every module whose forward is a linear of its weight (``nn.Linear`` and
    subclasses, ``Conv1D``; ``linear_modules``) except the output embedding, ``exclude`` and the linears whose
    weight is shared with another module (tied): an adapter would replace one use of it only
    (``shared_linears`` names them)."""
    skip = set(exclude) | set(shared_linears(model))
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = {name: lm for name, lm in linear_modules(model).items() if name not in skip and lm.module is not out_emb}
    if not found:
        raise RanapassError(f"{type(model).__name__} has no linear to adapt (nn.Linear or Conv1D; excluded: "
                            f"{sorted(skip)})")
    return found


def shared_linears(model: torch.nn.Module) -> list[str]:
    """Linear modules whose weight is also a parameter of another module (tied embeddings), by path."""
    owners: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    return [name for name, lm in linear_modules(model).items() if owners.get(id(lm.module.weight), 0) > 1]


def run_model(model: torch.nn.Module, batch: Any) -> Any:
    """Run the model on one batch for its activations: token ids (HF causal LM), a tensor, or a dict of
    keyword inputs. HF causal LMs compute the logits of the last position only (the statistics need
    none, and ``[batch, window, vocab]`` logits are the largest tensor of a forward)."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, torch.Tensor) and not batch.is_floating_point() and hasattr(model, "config"):
        if "logits_to_keep" in inspect.signature(model.forward).parameters:
            return model(input_ids=batch, logits_to_keep=1)
        return model(input_ids=batch)
    return model(batch)


def _batches(data: Any, batch_size: int, device: torch.device) -> Iterator[Any]:
    if isinstance(data, torch.Tensor):
        for i in range(0, data.shape[0], batch_size):
            yield data[i:i + batch_size].to(device)
    else:
        for b in data:
            yield {k: v.to(device) for k, v in b.items()} if isinstance(b, dict) else b.to(device)


def _tokens(t: torch.Tensor) -> int:
    """Tokens in one input: every id of an integer tensor, every row of a float one."""
    if not t.is_floating_point():
        return t.numel()
    return t.shape[:-1].numel() if t.dim() > 1 else 1


def _count(data: Any) -> tuple[int, int]:
    """(examples, tokens) of the data."""
    if isinstance(data, torch.Tensor):
        return data.shape[0], _tokens(data)
    return len(data), sum(_tokens(next(iter(b.values())) if isinstance(b, dict) else b) for b in data)


@torch.no_grad()
def _discover_sites(model: torch.nn.Module, linears: dict[str, LinearModule], first_batch: Any) -> list[list[str]]:
    """Group linears by the input tensor object they receive in one forward, in call order."""
    groups: dict[int, list[str]] = {}
    keep_alive = []
    calls: dict[str, int] = {}

    def hook(name):
        def pre(module, args):
            x = args[0]
            keep_alive.append(x)
            calls[name] = calls.get(name, 0) + 1
            groups.setdefault(id(x), [])
            if name not in groups[id(x)]:
                groups[id(x)].append(name)
        return pre

    with forward_hooks([(lm.module, hook(n)) for n, lm in linears.items()], pre=True):
        run_model(model, first_batch)
    sites, placed = [], set()
    for members in groups.values():
        members = [m for m in members if m not in placed]
        # A linear called several times (weight sharing) is a site of its own.
        shared = [m for m in members if calls[m] == 1]
        for m in members:
            if calls[m] > 1:
                sites.append([m])
                placed.add(m)
        if shared:
            sites.append(shared)
            placed.update(shared)
    missing = sorted(set(linears) - placed)
    if missing:
        log.warning("%d linears never ran during calibration and stay dense: %s", len(missing), missing[:8])
    return sites


def collect(model: torch.nn.Module, data: Any, *, linears: dict[str, LinearModule], batch_size: int = 4,
            sample_tokens: int = 2048, rank_min_aspect: float = RANK_MIN_ASPECT, gradient_data: Any = None,
            loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor] | None = None, seed: int = 0,
            stopwatch: Stopwatch | None = None) -> CalibrationStats:
    """Run calibration: site discovery, then statistics, then (optionally) output-gradient weights.

    Args:
        model: the model, in eval mode.
        data: token windows ``[N, L]`` or an iterable of model inputs.
        linears: the candidate linears (``candidate_linears``).
        batch_size: windows per forward.
        sample_tokens: rows kept per site for the candidate curves.
        rank_min_aspect: collect the Gram matrix only where a rank adapter may be considered.
        gradient_data: data for the backward pass (None: no gradient weights).
        loss_fn: ``loss_fn(model, batch) -> summed loss``; default: causal-LM loss for HF models.
        seed: seed of the row sampling.
        stopwatch: records the seconds of the "statistics" and "gradients" passes.
    """
    stopwatch = stopwatch or Stopwatch()
    device = next(model.parameters()).device
    if not isinstance(data, torch.Tensor):
        data = list(data)
    examples, tokens = _count(data)
    batches = list(_batches(data, batch_size, device))
    if not batches:
        raise RanapassError("calibration data is empty")
    site_members = _discover_sites(model, linears, batches[0])
    sites = []
    for members in site_members:
        n = linears[members[0]].in_features
        outs = [linears[m].out_features for m in members]
        wants_gram = max(max(outs), sum(outs)) >= rank_min_aspect * n
        on = execution_device(linears[members[0]].module)
        gram = torch.zeros(n, n, dtype=torch.float64, device=on) if wants_gram else None
        sites.append(SiteStats(list(members), n, outs, gram))
    min_tokens = max(s.in_features for s in sites)
    if tokens < min_tokens:
        raise RanapassError(f"calibration data has {tokens} tokens, fewer than the widest layer input "
                         f"({min_tokens}): statistics would be rank-deficient; give more or longer texts")

    gen = torch.Generator()
    per_batch = math.ceil(sample_tokens / len(batches))
    first_of = {s.members[0]: s for s in sites}
    sample_batch: dict[int, list[int]] = {id(s): [] for s in sites}   # global batch index of each sample
    current = [0]

    def hook(name):
        site = first_of.get(name)
        on = execution_device(linears[name].module)

        def pre(module, args):
            if site is None:
                return
            rows = args[0].detach().to(on)
            rows = rows.reshape(-1, rows.shape[-1])
            product = None
            if site.gram is not None:
                # float32 products (float64 for a float64 model), summed over batches in float64.
                flat = rows.to(torch.promote_types(rows.dtype, torch.float32))
                product = flat.t() @ flat
            # One number per input (sum of squares) or one in all (the sum) is finite iff every entry is,
            # short of overflow: a check that costs a pass over the rows at most.
            if not torch.isfinite(product.diagonal() if product is not None else rows.sum()).all():
                raise FloatingPointError(f"non-finite activation at the input of {name!r} during calibration: "
                                         "check the model's dtype (fp16 overflow?) and the calibration data")
            if product is not None:
                site.gram += product.double()
            site.tokens += rows.shape[0]
            k = min(per_batch, rows.shape[0])
            idx = torch.randperm(rows.shape[0], generator=gen)[:k]
            site.samples.append(rows[idx.to(rows.device)])
            sample_batch[id(site)].append(current[0])
        return pre

    with stopwatch.stage("statistics"), torch.no_grad(), \
            forward_hooks([(linears[m].module, hook(m)) for s in sites for m in s.members], pre=True):
        for index, batch in tqdm(distributed.shard(batches), desc="calibration", unit="batch"):
            current[0] = index
            gen.manual_seed(_batch_seed(seed, index))
            run_model(model, batch)
    _combine_processes(sites, sample_batch)

    grad_sq, first_order, first_order_se = {}, {}, {}
    if gradient_data is not None:
        with stopwatch.stage("gradients"):
            grad_sq, first_order, first_order_se = _gradient_statistics(model, linears, sites, gradient_data,
                                                                        loss_fn, device)
    return CalibrationStats(sites, grad_sq, examples, tokens, first_order, first_order_se)


def _batch_seed(seed: int, index: int) -> int:
    """The seed of the row sampling of global batch ``index``: independent of which process runs it.

    32 bits, since the CPU generator keeps only the low 32 bits of a seed.
    """
    return int.from_bytes(hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=4).digest(), "little")


def _combine_processes(sites: list[SiteStats], sample_batch: dict[int, list[int]]) -> None:
    """Sum the sites' Gram matrices and token counts over all processes; gather the samples in batch order."""
    if distributed.world_size() == 1:
        return
    tokens = torch.tensor([s.tokens for s in sites], dtype=torch.int64)
    distributed.all_reduce_sum([s.gram for s in sites if s.gram is not None] + [tokens], "input statistics")
    for site, count in zip(sites, tokens.tolist()):
        site.tokens = count
        site.samples = distributed.gather_ordered(list(zip(sample_batch[id(site)], site.samples)), "sampled rows")


def _lm_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    if not (isinstance(batch, torch.Tensor) and hasattr(model, "config")):
        raise RanapassError("output-gradient statistics need a loss: pass batches of token ids for a Hugging Face causal "
                         "LM, or loss_fn(model, batch); a profile can also do without them (error_weighting='relative')")
    logits = model(input_ids=batch).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                             reduction="sum")


@dataclasses.dataclass
class _DropGrid:
    """One member's neuron thresholds (rising) and the input scores' scale, for the first-order sums."""

    taus: torch.Tensor       # [K] rising score thresholds, on the member's device
    order: torch.Tensor      # [K] position of each rising threshold in neuron_thresholds' order
    col_norm: torch.Tensor   # [n] ||W[:, j]||
    sums: torch.Tensor       # [K] float64 running sums of h_j x_j over the inputs each threshold drops
    squares: torch.Tensor    # [K] float64 running sums over windows of (the window's sum / its tokens)^2

    @classmethod
    def of(cls, sample: torch.Tensor, linear: LinearModule) -> _DropGrid:
        with onloaded([linear.module]):
            weight = linear.weight.detach().float()
            taus, _ = neuron_thresholds(sample.to(weight.device), weight)
            col_norm = weight.norm(dim=0)
        taus = torch.tensor(taus, dtype=torch.float32, device=col_norm.device)
        rising, order = torch.sort(taus, stable=True)
        zeros = torch.zeros(len(taus), dtype=torch.float64, device=col_norm.device)
        return cls(rising, order, col_norm, zeros, zeros.clone())

    def add(self, x: torch.Tensor, h: torch.Tensor) -> None:
        """Accumulate one backward pass (one token window, or one batch as given): inputs ``x`` and input
        gradients ``h``, both ``[T, n]``."""
        x = x.float()
        scores = (x.abs() * self.col_norm).reshape(-1)
        # A threshold drops the scores below it: bucket b = the number of thresholds <= score, and the
        # entry is dropped by the thresholds at rising positions >= b. One compare per threshold: about
        # twice as fast on the CPU as bucketize's binary search for the ~20 thresholds of a curve.
        bucket = torch.zeros(scores.shape, dtype=torch.uint8 if len(self.taus) < 256 else torch.int32,
                             device=x.device)
        for tau in self.taus.tolist():
            bucket += scores >= tau
        per_bucket = torch.bincount(bucket.long(), weights=(x * h.float()).reshape(-1).double(),
                                    minlength=len(self.taus) + 1)
        window = torch.cumsum(per_bucket, 0)[:-1]
        self.sums[self.order] += window
        self.squares[self.order] += (window / x.shape[0]).square()


def _standard_error(mean: torch.Tensor, squares: torch.Tensor, windows: int) -> torch.Tensor:
    """The standard error of a mean over ``windows`` backward passes, from the sum of each pass's per-token
    value squared (NaN with fewer than 2). Exact for passes of equal length (token windows); batches of
    unequal length weigh alike in the spread."""
    if windows < 2:
        return torch.full_like(mean, float("nan"))
    variance = (squares - windows * mean.square()).clamp_min(0.0) / (windows - 1)
    return (variance / windows).sqrt()


def _gradient_statistics(model, linears, sites, data, loss_fn, device) -> tuple[dict[str, torch.Tensor], ...]:
    """Per member: the mean squared gradient of the summed loss w.r.t. its output, per output channel; the
    mean first-order loss change per token at each of its neuron thresholds (see the module docstring), and
    its standard error across the windows."""
    loss_fn = loss_fn or _lm_loss
    members = [m for s in sites for m in s.members]
    sums = {m: torch.zeros(linears[m].out_features, dtype=torch.float64,
                           device=execution_device(linears[m].module))
            for m in members}
    counts = dict.fromkeys(members, 0)
    windows = dict.fromkeys(members, 0)
    sampled = [(s, s.sample) for s in sites if s.samples]
    grids = {m: _DropGrid.of(x, linears[m]) for s, x in sampled if x.shape[0] for m in s.members}
    outputs: list[tuple[str, torch.Tensor]] = []
    inputs: list[tuple[str, torch.Tensor]] = []

    def pre(name):
        def hook(module, args):
            # A view per linear: its gradient is the input gradient through this linear alone (the
            # members of a site read one tensor, whose gradient sums theirs).
            x = args[0].view_as(args[0])
            if not x.requires_grad:
                x.requires_grad_()
            inputs.append((name, x))
            return (x, *args[1:])
        return hook

    def fwd(name):
        def hook(module, args, out):
            if not out.requires_grad:
                out.requires_grad_()
            outputs.append((name, out))
        return hook

    try:
        with forward_hooks([(linears[m].module, pre(m)) for m in grids], pre=True), \
                forward_hooks([(linears[m].module, fwd(m)) for m in members]):
            # One window per backward: the autograd graph of a batch is the memory peak of calibration.
            for _, batch in tqdm(distributed.shard(list(_batches(data, 1, device))), desc="output gradients",
                                 unit="window"):
                outputs.clear()
                inputs.clear()
                with torch.enable_grad():
                    loss = loss_fn(model, batch)
                    grads = torch.autograd.grad(loss, [t for _, t in outputs + inputs], allow_unused=True)
                for (name, _), g in zip(outputs, grads[:len(outputs)]):
                    if g is None:
                        continue
                    g = g.detach().reshape(-1, g.shape[-1]).float()
                    sums[name] += g.square().sum(0).double().to(sums[name].device)
                    counts[name] += g.shape[0]
                    windows[name] += 1
                for (name, x), h in zip(inputs, grads[len(outputs):]):
                    if h is not None:
                        n = x.shape[-1]
                        grids[name].add(x.detach().reshape(-1, n), h.detach().reshape(-1, n))
    finally:
        outputs.clear()
        inputs.clear()
    totals = torch.tensor([counts[m] for m in members] + [windows[m] for m in members], dtype=torch.int64)
    distributed.all_reduce_sum([sums[m] for m in members] + [g.sums for g in grids.values()]
                               + [g.squares for g in grids.values()] + [totals], "output-gradient statistics")
    counts = dict(zip(members, totals[:len(members)].tolist()))
    windows = dict(zip(members, totals[len(members):].tolist()))
    grad_sq = {m: sums[m] / counts[m] for m in members if counts[m]}
    first_order = {m: -grid.sums.cpu() / counts[m] for m, grid in grids.items() if counts[m]}
    first_order_se = {m: _standard_error(first_order[m], grids[m].squares.cpu(), windows[m]) for m in first_order}
    return grad_sq, first_order, first_order_se
