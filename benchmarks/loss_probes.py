"""The loss-calibration probes at several kept levels: measured KL and NLL change against the proxy.

SmolLM2-135M-Instruct on CPU, one profile of 32 calibration windows without loss calibration. For every
probe group of ``ranapass.loss_calibration`` (every unit of one block, then of one role) and every kept
level, the group's units become neuron adapters at that level and the model runs on the profile's two
held-out calibration windows: the mean KL of the next-token distribution from dense, the mean change of
the next-token NLL (signed), the group's summed proxy error, and KL per unit of proxy. The last column
compares that ratio at the highest level with the lowest: where it is not 1, a scale fitted at one level
misjudges the other::

    python benchmarks/loss_probes.py [--kept 0.5 0.85] [--cache DIR]    # about 2 minutes per level on 2 cores

Writes ``loss_probes.json`` and ``loss_probes.md`` into ``--out`` (default benchmarks/results).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see quality.py

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import ranapass  # noqa: E402
from ranapass.attach import temporarily_attached  # noqa: E402
from ranapass.evaluate import model_logits  # noqa: E402
from ranapass.loss_calibration import _probe_index, probe_groups, probe_plan  # noqa: E402
from ranapass.profiling import ProfileOptions  # noqa: E402


@torch.no_grad()
def kl_and_nll(model: torch.nn.Module, windows: torch.Tensor, dense: list[torch.Tensor]) -> tuple[float, float]:
    """Mean KL(dense || model) per position, and the mean change of the next-token NLL against dense."""
    kl = nll = 0.0
    count = predictions = 0
    for ref, batch in zip(dense, windows.split(4), strict=True):
        lp = F.log_softmax(model_logits(model(batch)).float(), -1)
        kl += float((ref.exp() * (ref - lp)).sum(-1).double().sum())
        target = batch[:, 1:, None]
        nll += float((ref[:, :-1].gather(-1, target) - lp[:, :-1].gather(-1, target)).double().sum())
        count += ref.shape[0] * ref.shape[1]
        predictions += target.numel()
    return kl / count, nll / predictions


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kept", nargs="+", type=float, default=[0.5, 0.85])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--cache", type=Path, default=None, help="profile cache folder (default: no cache)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = ranapass.load_model("smollm2")
    calibration = ranapass.calibration_windows(tokenizer, num_windows=32, window=512)
    plain = ranapass.profile(model, calibration, cache=args.cache or False, options=ProfileOptions(loss_calibration=False))
    holdout = plain.holdout
    with torch.no_grad():
        dense = [F.log_softmax(model_logits(model(b)).float(), -1) for b in holdout.split(4)]
    units = [u for s in plain.sites for u in s.separate if "neuron" in u.curves]
    rows = {}
    for label, group in probe_groups(units).items():
        rows[label] = {}
        for kept in sorted(args.kept):
            with temporarily_attached(model, probe_plan(model, group, kept)):
                kl, dnll = kl_and_nll(model, holdout, dense)
            proxy = sum(float(u.curves["neuron"].error[_probe_index(u, kept)]) for u in group)
            rows[label][str(kept)] = {"kl": kl, "nll_change": dnll, "proxy": proxy, "kl_per_proxy": kl / proxy}
        print(label, rows[label], flush=True)
    res = {"windows": int(holdout.shape[0]), "kept": sorted(args.kept), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "loss_probes.json").write_text(json.dumps(res, indent=1))
    (args.out / "loss_probes.md").write_text(report(res))
    print(report(res))
    return res


def report(res: dict) -> str:
    """Per probe group: KL, NLL change and KL per proxy at each level; the ratio of the last to the first."""
    levels = [str(k) for k in res["kept"]]
    head = " | ".join(f"KL at {k} | NLL change at {k} | KL/proxy at {k}" for k in levels)
    lines = [f"Probes on {res['windows']} held-out calibration windows; NLL change in nats per prediction.", "",
             f"| probe | {head} | KL/proxy {levels[-1]} ÷ {levels[0]} |", "|---" * (2 + 3 * len(levels)) + "|"]
    for label, row in res["rows"].items():
        cells = " | ".join(f"{row[k]['kl']:.2e} | {row[k]['nll_change']:+.2e} | {row[k]['kl_per_proxy']:.3g}" for k in levels)
        lines.append(f"| {label} | {cells} | {row[levels[-1]]['kl_per_proxy'] / row[levels[0]]['kl_per_proxy']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
