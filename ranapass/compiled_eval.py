"""Dense, eager adapted and compiled adapted perplexity of one plan, side by side (the demo's last step).

``compare_compiled(model, plan, windows)`` runs the model three ways on the same token windows: dense,
with the plan's adapters run eagerly (``evaluate.adapted_perplexity``, which also measures the kept ranks,
so the FLOPs are *measured*), and compiled with the ranapass backend. The compiled perplexity must equal the
eager adapted one up to rounding; the dense one is the baseline. A graph-diff summary says what the
pass rewrote.
"""

from __future__ import annotations

import dataclasses

import torch

from ranapass.attach import attach
from ranapass.backend import RanaBackend
from ranapass.diff import diff
from ranapass.evaluate import adapted_perplexity, perplexity
from ranapass.plan import Plan
from ranapass.plan_check import check_plan_fits

__all__ = ["CompiledComparison", "compare_compiled"]


@dataclasses.dataclass
class CompiledComparison:
    """Perplexities and FLOPs of one plan; ``flop_ratio_*`` are adapted over dense block-linear FLOPs."""

    budget: float
    dense_ppl: float
    eager_ppl: float
    compiled_ppl: float
    flop_ratio_expected: float
    flop_ratio_measured: float
    graphs: int
    units_rewritten: int
    units_adapted: int
    diff_summary: str

    @property
    def compiled_vs_eager(self) -> float:
        """Relative difference of the compiled and eager adapted perplexities."""
        return self.compiled_ppl / self.eager_ppl - 1.0

    def format(self) -> str:
        return "\n".join([
            f"plan at budget {self.budget:.3f}: {self.units_adapted} adapted units",
            f"  perplexity dense            {self.dense_ppl:9.3f}",
            f"  perplexity eager adapted    {self.eager_ppl:9.3f}",
            f"  perplexity compiled adapted {self.compiled_ppl:9.3f}  ({self.compiled_vs_eager:+.3%} vs eager)",
            f"  block-linear FLOPs / dense: expected {self.flop_ratio_expected:.4f}, measured "
            f"{self.flop_ratio_measured:.4f}",
            f"  compiled: {self.graphs} graph(s), {self.units_rewritten} unit(s) rewritten",
            "graph diff:", *("  " + line for line in self.diff_summary.splitlines()),
        ])


def compare_compiled(model: torch.nn.Module, plan: Plan, windows: torch.Tensor, *, batch_size: int = 4,
                     backend: RanaBackend | None = None, progress: bool = True) -> CompiledComparison:
    """Evaluate ``plan`` on ``model`` dense, eager adapted and compiled; attaches the plan (left attached).

    Raises ``PlanMismatchError`` first if ``plan`` was made for other weights.

    Args:
        model: a causal LM the plan was made for.
        plan: e.g. ``profile.plan(budget=0.56)``.
        windows: evaluation token windows ``[N, L]`` (``ranapass.data.evaluation_windows``).
        batch_size: windows per forward pass (keep ``N`` a multiple, so every compiled batch has one shape).
        backend: the backend to compile with (default ``RanaBackend(strict=True)``).
        progress: show progress bars.

    Example::

        model, tok = ranapass.models.load_model()
        plan = ranapass.profile(model, ranapass.data.calibration_windows(tok)).plan(budget=0.56)
        print(compare_compiled(model, plan, ranapass.data.evaluation_windows(tok)).format())
    """
    check_plan_fits(model, plan)
    backend = backend or RanaBackend(strict=True)
    dense = perplexity(model, windows, batch_size, progress=progress)
    eager = adapted_perplexity(model, plan, windows, batch_size, progress=progress)
    attach(model, plan)
    compiled = perplexity(torch.compile(model, backend=backend), windows, batch_size, progress=progress)
    backend.check(model)
    summary = diff(model, windows[:1, :16]).summary()
    return CompiledComparison(
        budget=plan.budget, dense_ppl=dense.ppl, eager_ppl=eager.perplexity.ppl, compiled_ppl=compiled.ppl,
        flop_ratio_expected=plan.expected_ratio(), flop_ratio_measured=eager.flop_ratio,
        graphs=len(backend.reports), units_rewritten=max(r.rewritten for r in backend.reports),
        units_adapted=len(plan.adapted), diff_summary=summary)
