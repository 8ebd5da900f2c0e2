"""Candidate curves: for one unit and one adapter kind, expected FLOPs and error of each configuration.

A configuration is (static rank nB, threshold tau) for the rank adapter and tau for the neuron
adapter. Both come from a sample of calibration inputs:

- rank adapter: with orthonormal A the squared output error of a token is the energy of the ranks it
  drops, so sorting all (token, rank) scores once and taking cumulative sums of their energies gives
  the kept count and the error of *every* threshold for every nB (no brute-force search);
- neuron adapter: the kept count comes from sorted input scores; the error ``||W (drop * x)||^2`` is
  evaluated exactly (with the output weights) on a sub-sample at each threshold of the grid. Its
  thresholds depend only on the sample and the weight (``neuron_thresholds``), so the gradient pass of
  calibration can measure each one's first-order loss change before the curve is built.

Errors are weighted per output channel (``out_weight``) so that units are comparable: relative
(``1 / E||y||^2``) or output-gradient (Fisher) weights; see ``ranapass.profile``.

The sorts and sums run on the device of the inputs (the sorts themselves in NumPy on the CPU, where it is
several times faster); the values a curve needs are gathered and read back once per curve, not one by one.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ranapass.cost_model import flops

__all__ = ["Curve", "KEEP_FRACTIONS", "rank_grid", "rank_curve", "neuron_thresholds", "neuron_curve",
           "static_rank_curve", "sorted_values"]

KEEP_FRACTIONS = np.array([0.03, 0.06, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65,
                           0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0])
"""Kept fractions (of nB ranks, or of n inputs) at which thresholds are placed; 1.0 = no mask."""


@dataclasses.dataclass
class Curve:
    """Configurations of one adapter kind on one unit. All arrays have one entry per candidate.

    Attributes:
        kind: "rank" or "neuron".
        rank: static rank nB (rank adapter) or the input width (neuron adapter).
        tau: score threshold (0 keeps everything: a static low-rank or dense-equivalent candidate).
        kept: expected kept ranks/inputs per token on the calibration sample.
        flops: expected FLOPs per token (cost_model/flops.py).
        error: expected weighted squared output error per token.
        first_order: expected first-order change of the loss per token, in nats, signed (the gradient
            of the loss against the output change; zeros where it was not measured).
    """

    FIELDS = ("rank", "tau", "kept", "flops", "error", "first_order")

    kind: str
    rank: np.ndarray
    tau: np.ndarray
    kept: np.ndarray
    flops: np.ndarray
    error: np.ndarray
    first_order: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.first_order is None:
            self.first_order = np.zeros(len(self.flops))

    def __len__(self) -> int:
        return len(self.flops)

    def select(self, mask: np.ndarray) -> Curve:
        return Curve(self.kind, *(getattr(self, f)[mask] for f in self.FIELDS))

    def arrays(self) -> dict[str, np.ndarray]:
        return {f: getattr(self, f) for f in self.FIELDS}


def rank_grid(r: int, steps: int = 16) -> list[int]:
    """Static ranks tried for a rank-r unit: denser near full rank, multiples of 8 when r allows."""
    fr = np.unique(np.concatenate([np.linspace(1 / steps, 1.0, steps), [0.98, 0.96, 0.94, 0.92]]))
    q = 8 if r >= 64 else 1
    ranks = sorted({max(q, min(r, int(round(f * r / q)) * q)) for f in fr} | {r})
    return ranks


def _rank_flops(m: int, n: int, rank: np.ndarray, kept: np.ndarray) -> np.ndarray:
    return np.asarray(flops.rank_adapter_per_token(m, n, rank.astype(np.float64), kept), dtype=np.float64)


@torch.no_grad()
def rank_curve(z: torch.Tensor, rank_weight: torch.Tensor, m: int, n: int, *, ranks: list[int] | None = None,
               fractions: np.ndarray = KEEP_FRACTIONS) -> Curve:
    """Candidates of a rank adapter from sample coordinates ``z = B x``.

    Args:
        z: ``[N, r]`` coordinates of N sample tokens on the orthonormal output basis (score = |z|).
        rank_weight: ``[r]`` error weight of each rank (``sum_c w_c A_ci^2``).
        m, n: the unit's output and input widths (for FLOPs).
        ranks: static ranks to try (default ``rank_grid(r)``); the curve lists them rising.
        fractions: kept fractions of nB at which thresholds are placed.
    """
    z = z.float()
    N, r = z.shape
    ranks = sorted(set(ranks)) if ranks else rank_grid(r)
    scores = z.abs().reshape(-1)
    energy = (z.square() * rank_weight.float()).reshape(-1).double()
    total = float(energy.sum()) / N
    order = _falling_order(scores)
    # Group g holds the entries of ranks [ranks[g-1], ranks[g]): static rank ranks[j] keeps groups 0..j.
    # Per group, the entries' positions in score order (rising) and the cumulative sums of their energies.
    of_rank = torch.bucketize(torch.arange(r, device=z.device), torch.tensor(ranks, device=z.device), right=True)
    group = of_rank.to(torch.int16)[order % r]
    by_group = _grouping_order(group)
    sizes = torch.bincount(group, minlength=len(ranks) + 1).tolist()   # the last: ranks >= max(ranks), never kept
    positions = by_group.split(sizes)[:-1]
    cumulative = [torch.cat([e.new_zeros(1), torch.cumsum(e, 0)])
                  for e in energy[order[by_group]].split(sizes)[:-1]]
    # The k-th kept entry of each (static rank, fraction) (k = 0: the first, which its threshold will drop).
    counts = [N * nb for nb in ranks]
    ks = [[int(round(f * c)) for f in fractions] for c in counts]
    static = torch.arange(len(ranks), device=z.device).repeat_interleave(len(fractions))
    wanted = torch.tensor([max(k, 1) for row in ks for k in row], device=z.device)
    inside = torch.arange(len(ranks), device=z.device)[:, None] <= static[None, :]   # [groups, queries]
    at = _kth_position(positions, inside, wanted, scores.numel())
    taken = torch.stack([torch.searchsorted(p, at, right=True) for p in positions])
    kept_energy = sum(torch.where(inside[g], c[taken[g]], 0.0) for g, c in enumerate(cumulative))
    all_energy = torch.cumsum(torch.stack([c[-1] for c in cumulative]), 0).tolist()
    tau_at, energy_at = scores[order[at]].double().tolist(), kept_energy.tolist()
    out = {"rank": [], "tau": [], "kept": [], "error": []}
    q = 0
    for j, (nb, count) in enumerate(zip(ranks, counts)):
        for f, k in zip(fractions, ks[j]):
            s_i, e_i = tau_at[q], energy_at[q]
            q += 1
            if f >= 1.0 or k >= count:
                tau, kept_e, k = 0.0, all_energy[j], count
            elif k == 0:
                tau, kept_e = s_i * 1.0001 + 1e-30, 0.0
            else:
                tau, kept_e = s_i, e_i
            out["rank"].append(nb)
            out["tau"].append(tau)
            out["kept"].append(k / N)
            out["error"].append(max(total - kept_e / N, 0.0))
    rank = np.array(out["rank"])
    kept = np.array(out["kept"])
    return Curve("rank", rank, np.array(out["tau"]), kept, _rank_flops(m, n, rank, kept), np.array(out["error"]))


def _falling_order(scores: torch.Tensor) -> torch.Tensor:
    """Indices that sort the non-negative finite ``scores`` (float32) falling, on their device. On the CPU
    NumPy sorts int64 keys (a score's bits, which rise with it, above its index), ~3x faster there than
    ``torch.argsort`` (benchmarks/RESULTS.md, profile speed)."""
    if scores.device.type != "cpu":
        return torch.argsort(scores, descending=True)
    flat = scores.numpy()
    keys = (flat.view(np.int32).astype(np.int64) << 32) | np.arange(flat.size, dtype=np.int64)
    keys.sort()
    return torch.from_numpy(keys[::-1] & 0xFFFFFFFF)


def _grouping_order(group: torch.Tensor) -> torch.Tensor:
    """Indices that sort the int16 ``group`` rising, stably (so rising within a group), on its device;
    NumPy's radix sort on the CPU (~5x faster there than a stable ``torch.sort``)."""
    if group.device.type != "cpu":
        return torch.sort(group, stable=True).indices
    return torch.from_numpy(np.argsort(group.numpy(), kind="stable"))


def _kth_position(positions: list[torch.Tensor], inside: torch.Tensor, wanted: torch.Tensor, size: int) -> torch.Tensor:
    """Per query q, the first position p (in score order) at which ``wanted[q]`` entries of the groups with
    ``inside[:, q]`` lie at or before p: a bisection over p, all queries at once."""
    lo = torch.zeros_like(wanted)
    hi = torch.full_like(wanted, size - 1)
    for _ in range(max(size - 1, 1).bit_length()):
        mid = (lo + hi) // 2
        seen = (torch.stack([torch.searchsorted(p, mid, right=True) for p in positions]) * inside).sum(0)
        enough = seen >= wanted
        hi = torch.where(enough, mid, hi)
        lo = torch.where(enough, lo, mid + 1)
    return lo


def static_rank_curve(energy: torch.Tensor, rank_weight: torch.Tensor, m: int, n: int,
                      ranks: list[int] | None = None) -> Curve:
    """Static low-rank candidates (no mask) from per-rank mean energies alone (no token sample needed).

    Used by data-free profiling: with ``C = I`` the energies are the squared singular values of W.
    """
    r = energy.numel()
    ranks = ranks or rank_grid(r)
    weighted = (energy.double() * rank_weight.double())
    total = float(weighted.sum())
    cum = torch.cumsum(weighted, 0)[torch.tensor(ranks, device=weighted.device) - 1].tolist()
    rank = np.array(ranks)
    kept = rank.astype(np.float64)
    error = np.array([max(total - c, 0.0) for c in cum])
    return Curve("rank", rank, np.zeros(len(ranks)), kept, _rank_flops(m, n, rank, kept), error)


def sorted_values(values: torch.Tensor) -> torch.Tensor:
    """``values`` flattened and sorted, rising, on their device. On the CPU the sort runs in NumPy, about
    15x faster there than ``torch.sort`` for millions of floats (benchmarks/RESULTS.md, profile speed)."""
    flat = values.detach().reshape(-1)
    if flat.device.type == "cpu":
        return torch.from_numpy(np.sort(flat.numpy()))
    return torch.sort(flat).values


@torch.no_grad()
def neuron_thresholds(x: torch.Tensor, weight: torch.Tensor,
                      fractions: np.ndarray = KEEP_FRACTIONS) -> tuple[list[float], list[int]]:
    """A neuron adapter's score thresholds on sample inputs ``x`` ``[N, n]``, one per kept fraction, and
    the number of (row, input) entries each keeps.

    The score of input j is ``|x_j| * ||W[:, j]||``; a threshold keeps the scores at or above it. 0
    keeps everything (fraction 1).
    """
    scores = x.float().abs() * weight.detach().float().norm(dim=0)
    rising = sorted_values(scores)
    count = rising.numel()
    ks = [int(round(f * count)) for f in fractions]
    # The k-th largest score of each fraction (k = 0: the largest, which its threshold will drop).
    picked = rising[torch.tensor([count - max(k, 1) for k in ks], device=rising.device)].tolist()
    taus = []
    for f, k, s_k in zip(fractions, ks, picked):
        tau = 0.0 if (f >= 1.0 or k >= count) else s_k
        if f < 1.0 and k == 0:
            tau = s_k * 1.0001 + 1e-30
        taus.append(tau)
    return taus, ks


@torch.no_grad()
def neuron_curve(x: torch.Tensor, weight: torch.Tensor, out_weight: torch.Tensor, *,
                 fractions: np.ndarray = KEEP_FRACTIONS, exact_tokens: int = 256,
                 first_order: np.ndarray | None = None) -> Curve:
    """Candidates of a neuron adapter from sample inputs.

    Args:
        x: ``[N, n]`` sample inputs of the unit.
        weight: ``[m, n]`` the (stacked) weight.
        out_weight: ``[m]`` error weight of each output channel.
        fractions: kept fractions of the n inputs at which thresholds are placed.
        exact_tokens: sample rows on which the error is computed exactly at every threshold.
        first_order: the first-order loss change at each threshold of ``neuron_thresholds(x, weight,
            fractions)`` (calibration's gradient pass), or None.
    """
    x = x.float()
    w = weight.detach().float()
    N, n = x.shape
    m = w.shape[0]
    taus, ks = neuron_thresholds(x, w, fractions)
    if first_order is not None and len(first_order) != len(taus):
        raise ValueError(f"first_order has {len(first_order)} entries for {len(taus)} thresholds")
    scores = x[:exact_tokens].abs() * w.norm(dim=0)
    xe = x[:exact_tokens]
    wo = out_weight.float().sqrt()
    kept, errors = [], []
    for tau, k in zip(taus, ks):
        dropped = torch.where(scores >= tau, 0.0, xe)
        err = ((dropped @ w.t()) * wo).square().sum(1).mean() if tau > 0 else torch.zeros((), device=x.device)
        kept.append(k / N if tau > 0 else float(n))
        errors.append(err)
    errors = torch.stack(errors).tolist()
    kept_a = np.array(kept)
    cost = np.asarray(flops.neuron_adapter_per_token(m, n, kept_a), dtype=np.float64)
    return Curve("neuron", np.full(len(kept_a), n), np.array(taus), kept_a, cost, np.array(errors),
                 None if first_order is None else np.asarray(first_order, dtype=np.float64))
