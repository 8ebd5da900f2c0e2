"""Output recovery: fit a per-output scale and bias of every adapted unit by distillation from the dense model.

An adapter drops the small contributions of its unit, which shrinks and shifts the unit's output; the
blocks after it were trained on the dense output. ``recover`` fits, with the masks frozen, an output
correction ``y' = out_scale * y + out_bias`` for every adapted unit (``AdapterSpec.out_scale`` and
``out_bias``: folded into the adapter's operands when it is bound, so it costs no FLOPs and every path,
eager, compiled and the kernels, runs it) that minimises the KL divergence of the adapted model's
next-token distribution from the dense model's on calibration windows::

    for each batch:  p = softmax(dense(x))                       # the same model, outside the adapters
                     q = softmax(adapted(x; out_scale, out_bias))  # masks constant, gradients to the corrections
                     step on KL(p || q) per token

After each epoch the KL on held-out windows is measured; the correction of the epoch with the lowest one
is kept, and none if no epoch beats the plan itself (the plan comes back as it was, ``meta["recovery"]``
says so). The correction moves the inputs of the units after it, and so their kept counts: every threshold
is then fitted again on the held-out windows (``fit_thresholds``) so each unit keeps the count it kept there
before the correction, which is also the recovered plan's ``expected_kept``. The FLOPs stay those of the plan
as it ran, also for a plan whose ``expected_kept`` was not fitted on these windows (a TEAL-style plan's is
its dense calibration quantile).
This is a training step (minutes for SmolLM2 on a CPU, seconds on a GPU) made once per plan; budget
queries (``Profile.plan``) stay instant. Measured gains: benchmarks/RESULTS.md, output recovery.

The argument checks, the frozen model, the correction hooks and the install-and-refit step are shared with
the bias step (``ranapass.bias_step``), the one-pass correction of the biases alone.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ranapass.attach import FlopMeter, attach, attachment_of, detach
from ranapass.data import check_token_ids
from ranapass.evaluate import model_logits
from ranapass.hooks import forward_hooks
from ranapass.plan import Plan
from ranapass.plan_check import check_plan_fits
from ranapass.thresholds import fit_thresholds

__all__ = ["recover"]

log = logging.getLogger(__name__)


def recover(model: torch.nn.Module, plan: Plan, windows: torch.Tensor, holdout: torch.Tensor, *,
            epochs: int = 3, lr: float = 3e-3, batch_size: int = 2, seed: int = 0, progress: bool = True) -> Plan:
    """A copy of ``plan`` whose adapters carry an output correction fitted on ``windows``, thresholds refitted.

    Args:
        model: the model ``plan`` was made for (a causal LM returning logits); left as it was.
        plan: the plan to recover (not modified). Units of a kind without an output operand (the CATS-style
            gated mask) stay as they are.
        windows: training token windows ``[N, L]`` (calibration text, not the evaluation text).
        holdout: token windows ``[M, L]`` the thresholds are refitted on (``Profile.holdout``).
        epochs: passes over ``windows``.
        lr: Adam's step size.
        batch_size: windows per step.
        seed: the order of the windows in each epoch.
        progress: show a tqdm bar.

    Example::

        >>> plan = profile.plan(0.56)  # doctest: +SKIP
        >>> plan = ranapass.recover(model, plan, calibration_windows(tokenizer), profile.holdout)  # doctest: +SKIP
    """
    if epochs < 1 or batch_size < 1 or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"epochs ({epochs}) and batch_size ({batch_size}) must be >= 1 and lr ({lr}) positive")
    recovered, units = correctable_copy(model, plan, windows, holdout)
    device = next(model.parameters()).device
    corrections = {u.name: (torch.ones(u.adapter.out_total, device=device, requires_grad=True),
                            torch.zeros(u.adapter.out_total, device=device, requires_grad=True)) for u in units}
    history, kept_counts = _distill(model, recovered, windows, holdout, corrections, epochs, lr, batch_size, seed,
                                    progress)
    best = min(range(len(history)), key=lambda e: history[e]["holdout_kl"])
    correction = [h.pop("correction", None) for h in history][best]
    recovered.meta["recovery"] = {"windows": int(windows.shape[0]), "epochs": epochs, "lr": lr,
                                  "batch_size": batch_size, "seed": seed, "history": history, "kept_epoch": best}
    if correction is None:
        log.warning("no epoch of output recovery lowered the held-out KL (%.4g nats per token without a "
                    "correction): the plan is returned without one", history[0]["holdout_kl"])
        return recovered
    install_correction(model, recovered, correction, kept_counts, holdout)
    return recovered


def install_correction(model: torch.nn.Module, plan: Plan, correction: dict[str, tuple[torch.Tensor, torch.Tensor]],
                       kept_counts: dict[str, float], holdout: torch.Tensor) -> None:
    """Give ``plan``'s units their ``(out_scale, out_bias)`` and refit every threshold on ``holdout`` to the
    count its unit kept there before the correction (``kept_counts``), so the FLOPs stay those of the plan as
    it ran. Mutates ``plan``."""
    for u in plan.adapted:
        if u.name in correction:
            u.adapter.out_scale, u.adapter.out_bias = correction[u.name]
        u.expected_kept = kept_counts.get(u.name, u.expected_kept)
    fit_thresholds(model, plan, holdout)
    plan.meta["thresholds"] = f"fitted after the output correction on {holdout.shape[0]} held-out windows"


def correctable_copy(model: torch.nn.Module, plan: Plan, windows: torch.Tensor, holdout: torch.Tensor
                     ) -> tuple[Plan, list]:
    """Check the arguments of an output correction; return a copy of ``plan`` and its units that take one."""
    check_plan_fits(model, plan)
    if windows.dim() != 2 or holdout.dim() != 2:
        raise ValueError(f"windows and holdout must be token windows [N, L], got shapes {tuple(windows.shape)} "
                         f"and {tuple(holdout.shape)}")
    check_token_ids(windows, model, "calibration windows")
    check_token_ids(holdout, model, "held-out windows")
    corrected = copy.deepcopy(plan)
    units = [u for u in corrected.adapted if u.adapter.output_operand is not None]
    if not units:
        raise ValueError("the plan has no adapted unit whose output can be corrected: nothing to correct")
    return corrected, units


@contextlib.contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode with its parameters frozen inside the block; its flags, mode and attachment
    restored after it."""
    previous = attachment_of(model)
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    training = model.training
    try:
        for p, _ in grad_flags:
            p.requires_grad_(False)
        model.eval()
        yield
    finally:
        detach(model)
        if previous is not None:
            attach(model, previous.plan, check_fingerprint=False)
        for p, flag in grad_flags:
            p.requires_grad_(flag)
        model.train(training)


def _distill(model: torch.nn.Module, plan: Plan, windows: torch.Tensor, holdout: torch.Tensor,
             corrections: dict[str, tuple[torch.Tensor, torch.Tensor]], epochs: int, lr: float, batch_size: int,
             seed: int, progress: bool) -> tuple[list[dict], dict[str, float]]:
    """Train ``corrections`` (applied by forward hooks on the members) on KL(dense || adapted).

    Returns one record per epoch, epoch 0 being the plan without a correction: the mean KL per token on
    ``holdout`` and (from epoch 1) on the training windows, and a CPU copy of the correction after it; and
    the mean kept count per token of every adapted unit on ``holdout`` without a correction. The model's
    parameters, mode and attachment are restored afterwards."""
    device = next(model.parameters()).device
    hooks = correction_hooks(model, plan, corrections)
    gen = torch.Generator().manual_seed(seed)
    history = []
    with frozen(model):
        rms = output_rms(model, plan, windows[:batch_size].to(device))
        # Adam's steps are about lr in size whatever the gradient: the bias steps in units of its output's RMS
        opt = torch.optim.Adam([{"params": [scale]} for scale, _ in corrections.values()]
                               + [{"params": [bias], "lr": lr * rms[name]} for name, (_, bias) in corrections.items()],
                               lr=lr)
        attachment = attach(model, plan, check_fingerprint=False)
        with FlopMeter() as meter:
            history.append({"epoch": 0, "holdout_kl": mean_kl(model, attachment, [], holdout, batch_size)})
        kept_counts = {name: meter.mean_kept(name) for name in meter.tokens}
        steps = epochs * math.ceil(len(windows) / batch_size)
        with tqdm(total=steps, desc="recovery", unit="step", disable=not progress) as bar:
            for epoch in range(1, epochs + 1):
                total, tokens = 0.0, 0
                for idx in torch.randperm(len(windows), generator=gen).split(batch_size):
                    batch = windows[idx].to(device)
                    loss = kl_sum(model, attachment, hooks, batch) / batch.numel()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += float(loss.detach()) * batch.numel()
                    tokens += batch.numel()
                    bar.update(1)
                    bar.set_postfix(kl=f"{total / tokens:.4f}")
                held = mean_kl(model, attachment, hooks, holdout, batch_size)
                history.append({"epoch": epoch, "train_kl": total / tokens, "holdout_kl": held,
                                "correction": {name: (s.detach().cpu().clone(), b.detach().cpu().clone())
                                               for name, (s, b) in corrections.items()}})
                log.info("recovery epoch %d: mean KL %.4f (training) %.4f (held out) nats per token",
                         epoch, total / tokens, held)
    return history, kept_counts


def correction_hooks(model: torch.nn.Module, plan: Plan, corrections: dict[str, tuple[torch.Tensor, torch.Tensor]]
                     ) -> list:
    """``(member module, hook)`` pairs that apply each unit's ``(scale, bias)`` to its members' outputs."""
    hooks = []
    for u in plan.adapted:
        if u.name in corrections:
            scale, bias = corrections[u.name]
            start = 0
            for path, m in zip(u.members, u.out_features):
                hooks.append((model.get_submodule(path), corrector(scale[start:start + m], bias[start:start + m])))
                start += m
    return hooks


def kl_sum(model: torch.nn.Module, attachment, hooks: list, batch: torch.Tensor) -> torch.Tensor:
    """KL(dense || adapted) summed over the tokens of ``batch``; the adapted pass runs ``hooks``."""
    with torch.no_grad():
        dense = F.log_softmax(model_logits(model(batch)).float(), dim=-1)
    with attachment.eager(), forward_hooks(hooks):
        adapted = F.log_softmax(model_logits(model(batch)).float(), dim=-1)
    return F.kl_div(adapted, dense, log_target=True, reduction="sum")


@torch.no_grad()
def mean_kl(model: torch.nn.Module, attachment, hooks: list, windows: torch.Tensor, batch_size: int) -> float:
    """Mean KL(dense || adapted) per token over ``windows``."""
    device = next(model.parameters()).device
    total = sum(float(kl_sum(model, attachment, hooks, batch.to(device))) for batch in windows.split(batch_size))
    return total / windows.numel()


@torch.no_grad()
def output_rms(model: torch.nn.Module, plan: Plan, batch: torch.Tensor) -> dict[str, float]:
    """Root mean square of each adapted unit's dense output on ``batch`` (its members' outputs together)."""
    sums: dict[str, list[float]] = {u.name: [0.0, 0.0] for u in plan.adapted}

    def record(name: str):
        def hook(_module, _args, out):
            sums[name][0] += float(out.float().pow(2).sum())
            sums[name][1] += out.numel()
        return hook

    with forward_hooks([(model.get_submodule(path), record(u.name)) for u in plan.adapted for path in u.members]):
        model(batch)
    return {name: math.sqrt(total / max(count, 1)) or 1.0 for name, (total, count) in sums.items()}


def corrector(scale: torch.Tensor, bias: torch.Tensor):
    """Forward hook: ``out * scale + bias`` in float32, returned in the output's dtype."""
    def hook(_module, _args, out):
        return (out.float() * scale + bias).to(out.dtype)
    return hook
