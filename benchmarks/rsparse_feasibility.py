"""Feasibility of an R-Sparse-style adapter kind: does a low-rank term for the dropped inputs pay at equal FLOPs?

For a linear ``y = W x`` (W of shape m x n) the neuron adapter computes ``W (keep * x)`` with
``keep_j = |x_j| * ||W[:, j]|| >= tau``; its FLOPs per token are ``2 m k + 2 n`` (k kept inputs, the mask).
The candidate kind adds ``L ((1 - keep) * x)`` with ``L = U V^T`` of rank r, fitted to the dropped part:
``L = A_r A_r^T W`` with ``A_r`` the top r eigenvectors of ``W C_d W^T``, ``C_d`` the second moment of the
dropped residual ``d = (1 - keep) * x`` at that threshold (the best rank-r approximation of W under that
moment, SVD-LLM's whitening). Its FLOPs per token are ``2 m k + 2 n + 2 r (n + m)`` ("full" costing: V^T
reads every input); a kernel that reads only the dropped rows of V^T would pay ``2 r (n - k + m)``
("dropped-only" costing), reported beside it.

On SmolLM2-135M-Instruct, for every projection of a few decoder blocks: thresholds and L are fitted on
calibration windows (Python-docs calibration split), errors ``E||Wx - y_hat||^2 / E||Wx||^2`` and FLOPs
are measured on held-out windows (the evaluation split). At each FLOP ratio, (a) the neuron adapter's
held-out error, interpolated at that measured ratio, against (b) the compensated kind with the rank r
chosen on the calibration tokens (the best split of the same FLOPs between kept inputs and rank). Also
measured: the rank-32 term with compensation-aware input selection (``--aware-ranks``), and the neuron
adapter plus a constant bias ``W E[d]`` (the dropped inputs' calibration mean; no FLOPs per token)::

    nice -n 10 python benchmarks/rsparse_feasibility.py [--blocks 2 15 27] [--out DIR]
    # 27-32 min on 2 cores shared with other jobs (load 4-6); one block (--blocks 15) is a third of that

Writes ``rsparse_feasibility.json`` (every unit's curves) and ``rsparse_feasibility.md`` (the tables).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see quality.py

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import markdown_table  # noqa: E402

import ranapass  # noqa: E402
from ranapass.decompose import gram_factor, output_pca  # noqa: E402
from ranapass.hooks import forward_hooks  # noqa: E402

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
RATIOS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
RANKS = (0, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
KEEP = np.round(np.arange(0.05, 1.0001, 0.05), 4)
"""Kept fractions of the inputs (on the calibration tokens) at which thresholds are placed."""
MARGIN = 0.15
"""A unit counts as a win when the compensated kind's held-out error is at least this much lower."""


@torch.no_grad()
def collect_inputs(model: torch.nn.Module, windows: torch.Tensor, paths: list[str]) -> dict[str, torch.Tensor]:
    """``[tokens, n]`` float32 inputs of each linear in ``paths`` over ``windows`` (one window per forward)."""
    modules = dict(model.named_modules())
    got: dict[str, list[torch.Tensor]] = {p: [] for p in paths}

    def recorder(path):
        return lambda module, args: got[path].append(args[0].detach().reshape(-1, args[0].shape[-1]).float())

    with forward_hooks([(modules[p], recorder(p)) for p in paths], pre=True):
        for w in windows:
            model(w[None])
    return {p: torch.cat(v) for p, v in got.items()}


@torch.no_grad()
def dropped_basis(weight: torch.Tensor, dropped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Output axes of ``W d`` by falling energy, for dropped residuals ``d`` (``[N, n]``).

    Returns ``A`` (``[m, min(m, n)]`` float32, orthonormal columns) and the mean squared output along
    each axis (float64; their sum is ``E||W d||^2`` on these tokens). Narrow outputs (m <= n) take the
    eigenvectors of ``W C_d W^T`` directly (an m x m problem); tall stacks go through ``ranapass.decompose``.
    """
    gram = (dropped.t() @ dropped).double() / dropped.shape[0]
    m, n = weight.shape
    if m > n:
        return output_pca(weight, gram_factor(gram, 1))
    w = weight.double()
    energy, vecs = torch.linalg.eigh(w @ gram @ w.t())
    return vecs.flip(1).float().contiguous(), energy.flip(0).clamp_min(0.0)


def _errors(basis: tuple[torch.Tensor, torch.Tensor], ranks: list[int], y_held: torch.Tensor,
            totals: list[float]) -> list[np.ndarray]:
    """Relative error ``E||(I - A_r A_r^T) W d||^2 / E||Wx||^2`` at each rank, in-sample and held out.

    In-sample, the basis's energies split ``E||W d||^2``; ``y_held`` is the held-out ``W d`` (``[N, m]``).
    """
    a, energy = basis
    y_fit = float(energy.sum())
    top = max(ranks)
    zero = torch.zeros(1, dtype=torch.float64)
    cum_fit = torch.cat([zero, energy[:top].cumsum(0)])
    cum_held = torch.cat([zero, (y_held @ a[:, :top]).double().square().mean(0).cumsum(0)])
    idx = torch.tensor(ranks)
    held = float(y_held.double().square().sum(1).mean())
    return [(y_fit - cum_fit[idx]).clamp_min(0.0).numpy() / totals[0],
            (held - cum_held[idx]).clamp_min(0.0).numpy() / totals[1]]


def _threshold(scores: torch.Tensor, kept: float) -> float:
    """The score threshold that keeps fraction ``kept`` of the (token, input) entries of ``scores``."""
    if kept >= 1.0:
        return 0.0
    flat = torch.sort(scores.reshape(-1), descending=True).values
    return float(flat[int(round(kept * flat.numel())) - 1])


@torch.no_grad()
def unit_curves(weight: torch.Tensor, x_fit: torch.Tensor, x_held: torch.Tensor, aware_ranks: list[int]) -> dict:
    """Kept fraction and relative error per threshold and candidate column, on calibration and held-out tokens.

    Columns: ``("plain", r)`` for every rank of RANKS that fits (rank 0 is the neuron adapter), inputs kept by
    ``|x_j| ||W[:, j]||``; ``("aware", r)`` for ``aware_ranks``, inputs kept by ``|x_j| ||(I - P_r) W[:, j]||``
    with ``P_r`` the plain fit's rank-r projection (what the compensation cannot restore), then L refitted
    to the new dropped set; ``("mean", 0)``: the neuron adapter plus the bias ``W E[d]`` (the dropped inputs'
    calibration mean, no FLOPs per token). Returns ``columns`` and arrays ``[len(KEEP), len(columns)]``: ``kept_fit``,
    ``kept_held`` (fractions of n), ``err_fit`` (in-sample), ``err_held``.
    """
    w = weight.float()
    m, n = w.shape
    ranks = [r for r in RANKS if r <= min(m, n)]
    aware = [r for r in aware_ranks if 0 < r <= min(m, n)]
    columns = [("plain", r) for r in ranks] + [("aware", r) for r in aware] + [("mean", 0)]
    totals = [float((x @ w.t()).double().square().sum(1).mean()) for x in (x_fit, x_held)]
    out = {k: [] for k in ("kept_fit", "kept_held", "err_fit", "err_held")}

    def select(norms: torch.Tensor, f: float) -> tuple[list[torch.Tensor], list[float]]:
        s_fit, s_held = x_fit.abs() * norms, x_held.abs() * norms
        tau = _threshold(s_fit, f)
        dropped = [torch.where(s >= tau, 0.0, x) for s, x in ((s_fit, x_fit), (s_held, x_held))]
        return dropped, [float((s >= tau).float().sum(1).mean()) / n for s in (s_fit, s_held)]

    for f in KEEP:
        dropped, kept = select(w.norm(dim=0), f)
        if f >= 1.0:  # nothing dropped: every column is exact
            errs, kept_cols = [np.zeros(len(columns))] * 2, [[k] * len(columns) for k in kept]
        else:
            basis = dropped_basis(w, dropped[0])
            errs = _errors(basis, ranks, dropped[1] @ w.t(), totals)
            kept_cols = [[k] * len(ranks) for k in kept]
            for r in aware:
                p_r = basis[0][:, :r]
                dropped_r, kept_r = select((w - p_r @ (p_r.t() @ w)).norm(dim=0), f)
                errs_r = _errors(dropped_basis(w, dropped_r[0]), [r], dropped_r[1] @ w.t(), totals)
                errs = [np.append(e, er) for e, er in zip(errs, errs_r)]
                for kc, k in zip(kept_cols, kept_r):
                    kc.append(k)
            mu = dropped[0].mean(0)  # the mean bias: W mu added to every token, no FLOPs per token
            errs = [np.append(errs[0], max(float(basis[1].sum()) - float((w @ mu).double().square().sum()), 0.0)
                              / totals[0]),
                    np.append(errs[1], float(((dropped[1] - mu) @ w.t()).double().square().sum(1).mean()) / totals[1])]
            for kc, k in zip(kept_cols, kept):
                kc.append(k)
        out["kept_fit"].append(kept_cols[0])
        out["kept_held"].append(kept_cols[1])
        out["err_fit"].append(errs[0])
        out["err_held"].append(errs[1])
    return {k: np.array(v, dtype=np.float64) for k, v in out.items()} | {"m": m, "n": n, "columns": columns}


def flop_ratio(m: int, n: int, kept: np.ndarray, r: int, costing: str) -> np.ndarray:
    """FLOPs per token of the compensated kind (r = 0: the neuron adapter) over the dense ``2 m n``."""
    k = kept * n
    v_rows = n if costing == "full" else n - k
    return (2 * m * k + 2 * n + 2 * r * (v_rows + m) * (r > 0)) / (2 * m * n)


def at_ratio(ratio: float, flops: np.ndarray, err: np.ndarray) -> float:
    """Error at FLOP ratio ``ratio``, interpolated linearly in log error (NaN outside the measured range)."""
    order = np.argsort(flops)
    f, e = flops[order], err[order]
    if len(f) == 0 or ratio < f[0] or ratio > f[-1]:
        return float("nan")
    return float(np.exp(np.interp(ratio, f, np.log(np.maximum(e, 1e-12)))))


def compare(curves: dict, costing: str) -> list[dict]:
    """Per FLOP ratio: neuron error, compensated error of the column chosen on calibration tokens, the gain.

    ``oracle`` is the lowest held-out error over the low-rank columns (an optimistic bound, chosen on the
    held-out tokens); ``mean_bias`` the held-out error of the neuron adapter with the mean bias.
    """
    m, n, columns = curves["m"], curves["n"], curves["columns"]

    def err(ratio: float, j: int, split: str) -> float:
        r = columns[j][1]
        return at_ratio(ratio, flop_ratio(m, n, curves[f"kept_{split}"][:, j], r, costing),
                        curves[f"err_{split}"][:, j])

    lowrank = [j for j, c in enumerate(columns) if c[0] != "mean"]
    mean = columns.index(("mean", 0))
    rows = []
    for ratio in RATIOS:
        fit = [err(ratio, j, "fit") for j in lowrank]
        best = lowrank[int(np.nanargmin(fit))] if not np.all(np.isnan(fit)) else 0
        neuron, comp, bias = err(ratio, 0, "held"), err(ratio, best, "held"), err(ratio, mean, "held")
        oracle = float(np.nanmin([err(ratio, j, "held") for j in lowrank]))
        rows.append({"ratio": ratio, "neuron": neuron, "compensated": comp, "rank": columns[best][1],
                     "selection": columns[best][0], "gain": 1 - comp / neuron if neuron > 0 else 0.0,
                     "oracle": oracle, "oracle_gain": 1 - oracle / neuron if neuron > 0 else 0.0,
                     "mean_bias": bias, "mean_bias_gain": 1 - bias / neuron if neuron > 0 else 0.0})
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, nargs="+", default=[2, 15, 27])
    ap.add_argument("--fit-windows", type=int, default=16, help="calibration windows of 512 tokens")
    ap.add_argument("--held-windows", type=int, default=8, help="evaluation windows of 512 tokens")
    ap.add_argument("--aware-ranks", type=int, nargs="*", default=[32],
                    help="ranks also tried with compensation-aware input selection")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--from-json", type=Path, help="only write the tables again from this run's JSON (no measuring)")
    args = ap.parse_args(argv)
    if args.from_json:
        report = json.loads(args.from_json.read_text())
        write_atomic(args.out / "rsparse_feasibility.md", markdown(report))
        return report
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, tokenizer = ranapass.load_model("smollm2")
    fit = ranapass.calibration_windows(tokenizer, num_windows=args.fit_windows, window=512)
    held = ranapass.evaluation_windows(tokenizer, num_windows=args.held_windows, window=512)
    paths = [f"model.layers.{b}.{p}" for b in args.blocks for p in PROJECTIONS]
    x_fit = collect_inputs(model, fit, paths)
    x_held = collect_inputs(model, held, paths)
    modules = dict(model.named_modules())
    results = {}
    for p in paths:
        t0 = time.perf_counter()
        curves = unit_curves(modules[p].weight.detach(), x_fit.pop(p), x_held.pop(p), args.aware_ranks)
        results[p] = {"m": curves["m"], "n": curves["n"], "columns": curves["columns"],
                      "curves": {k: v.tolist() for k, v in curves.items() if k not in ("m", "n", "columns")},
                      "full": compare(curves, "full"), "dropped-only": compare(curves, "dropped-only")}
        print(f"{p}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    report = {"command": "python benchmarks/rsparse_feasibility.py " + " ".join(argv or sys.argv[1:]),
              "blocks": args.blocks, "fit_tokens": args.fit_windows * 512, "held_tokens": args.held_windows * 512,
              "ratios": RATIOS, "ranks": RANKS, "aware_ranks": args.aware_ranks, "keep_grid": KEEP.tolist(),
              "margin": MARGIN,              "seconds": time.perf_counter() - start, "units": results}
    report["summary"] = {c: summary(results, c) for c in ("full", "dropped-only")}
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "rsparse_feasibility.json", json.dumps(report, indent=1, default=float))
    md = markdown(report)
    write_atomic(args.out / "rsparse_feasibility.md", md)
    print(md)
    return report


def summary(results: dict, costing: str) -> dict:
    """Per ratio: units where the compensated kind's held-out error is at least MARGIN lower, and the median gain."""
    out = {}
    for i, ratio in enumerate(RATIOS):
        gains = np.array([u[costing][i]["gain"] for u in results.values()])
        gains = gains[~np.isnan(gains)]
        oracle = np.array([u[costing][i]["oracle_gain"] for u in results.values()])
        bias = np.array([u[costing][i]["mean_bias_gain"] for u in results.values()])
        out[str(ratio)] = {"units": len(gains), "wins": int((gains >= MARGIN).sum()),
                           "median_gain": float(np.median(gains)) if len(gains) else float("nan"),
                           "max_gain": float(np.max(gains)) if len(gains) else float("nan"),
                           "oracle_wins": int((oracle >= MARGIN).sum()),
                           "mean_bias_median_gain": float(np.median(bias)), "mean_bias_max_gain": float(np.max(bias)),
                           "mean_bias_wins": int((bias >= MARGIN).sum())}
    return out


def markdown(report: dict) -> str:
    lines = [f"# R-Sparse-style compensation: feasibility at equal FLOPs (SmolLM2-135M-Instruct)", "",
             f"`{report['command']}`: thresholds and L fitted on {report['fit_tokens']} calibration tokens, "
             f"errors and FLOPs measured on {report['held_tokens']} held-out tokens ({report['seconds']:.0f} s). "
             "Each cell: neuron-adapter error / compensated error (rank r chosen on calibration tokens; 'a': inputs "
             "selected compensation-aware), relative output error E||Wx - y||^2 / E||Wx||^2 at the FLOP ratio of "
             "the column, and the compensated kind's gain (lower error is a positive gain).", ""]
    for costing in ("full", "dropped-only"):
        lines += [f"## Costing: {costing} (" + ("V^T reads every input: +2r(n+m)" if costing == "full"
                                                  else "V^T reads only dropped inputs: +2r(n-k+m)") + ")", ""]
        rows = []
        for path, u in report["units"].items():
            row = {"unit": path.removeprefix("model.layers."), "m x n": f"{u['m']}x{u['n']}"}
            for c in u[costing]:
                row[str(c["ratio"])] = (f"{c['neuron']:.4f} / {c['compensated']:.4f} (r {c['rank']}{'a' if c['selection'] == 'aware' else ''}, "
                                        f"{100 * c['gain']:+.0f}%)")
            rows.append(row)
        lines += [markdown_table(rows, ["unit", "m x n"] + [str(r) for r in RATIOS]), ""]
        s = report["summary"][costing]
        cols = ["ratio", "units with >= 15% lower error", "median gain", "largest gain",
                "units >= 15% lower, column chosen on held-out"]
        lines += [markdown_table([{cols[0]: r, cols[1]: f"{v['wins']} / {v['units']}",
                                   cols[2]: f"{100 * v['median_gain']:.1f}%", cols[3]: f"{100 * v['max_gain']:.1f}%",
                                   cols[4]: f"{v['oracle_wins']} / {v['units']}"} for r, v in s.items()], cols), ""]
    lines += why(report)
    lines += ["## Neuron adapter plus the mean bias W E[d] (no FLOPs per token)", "",
              "Gain of the bias over the plain neuron adapter at each FLOP ratio (held-out error):", ""]
    rows = [{"unit": path.removeprefix("model.layers."), **{str(c["ratio"]): f"{100 * c['mean_bias_gain']:+.0f}%"
                                                          for c in u["full"]}} for path, u in report["units"].items()]
    lines += [markdown_table(rows, ["unit"] + [str(r) for r in RATIOS]), ""]
    s = report["summary"]["full"]
    cols = ["ratio", "units with >= 15% lower error", "median gain", "largest gain"]
    lines += [markdown_table([{cols[0]: r, cols[1]: f"{v['mean_bias_wins']} / {v['units']}",
                               cols[2]: f"{100 * v['mean_bias_median_gain']:.1f}%",
                               cols[3]: f"{100 * v['mean_bias_max_gain']:.1f}%"} for r, v in s.items()], cols), ""]
    return "\n".join(lines)


def why(report: dict, kept: float = 0.6) -> list[str]:
    """Lines of the table that explains the result: what a rank buys against what it costs, at one kept fraction."""
    i = int(np.argmin(np.abs(np.array(report["keep_grid"]) - kept)))
    j = int(np.argmin(np.abs(np.array(report["keep_grid"]) - (kept - 0.1))))
    cols = ["unit", "one rank costs (inputs)", "dropped error removed by r 4 / 32 / 128",
            "neuron error x when 10 points fewer kept"]
    rows = []
    for path, u in report["units"].items():
        columns = [tuple(c) for c in u["columns"]]
        err = np.array(u["curves"]["err_held"])
        removed = [f"{100 * (1 - err[i, columns.index(('plain', r))] / err[i, 0]):.0f}%"
                   for r in (4, 32, 128) if ("plain", r) in columns]
        rows.append({cols[0]: path.removeprefix("model.layers."), cols[1]: f"{(u['n'] + u['m']) / u['m']:.2f}",
                     cols[2]: " / ".join(removed), cols[3]: f"{err[j, 0] / err[i, 0]:.2f}"})
    return [f"## What a rank buys, at {report['keep_grid'][i]:.2f} of the inputs kept (held-out)", "",
            "A rank costs 2(n + m) FLOPs per token, the price of (n + m) / m kept inputs; the low-rank term removes "
            "the share shown of the error the dropped inputs leave; keeping 10 points fewer inputs multiplies the "
            "neuron adapter's error by the last column.", "", markdown_table(rows, cols), ""]


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
