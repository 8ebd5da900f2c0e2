"""The bias step: one Gauss-Newton step on a per-output bias of every adapted unit.

Most of what output recovery (``ranapass.recover``) buys comes from its biases: on a 0.56 plan of SmolLM2
the recovered biases alone (scales set to one) lower perplexity as much as biases and scales together
(benchmarks/RESULTS.md, the bias step). ``bias_step`` computes such a bias in one pass instead of epochs of
training. With ``b_u`` the bias added to unit ``u``'s output ``y_u`` (masks frozen)::

    g_u = mean over tokens of dKL(dense || adapted) / d y_u        # one backward pass of the KL
    f_u = mean over tokens of (dNLL(s) / d y_u)^2, s ~ adapted       # one backward pass of the model's own
                                                                    # sampled tokens: the diagonal Fisher
    d_u = -g_u / (f_u + damping * mean(f_u))
    b_u = alpha * d_u,  alpha on a doubling grid, the one with the lowest KL on the held-out windows

A plan already close to the dense model (held-out KL under ``min_plan_kl``) gets no step: what is left of
its KL is partly the gain of mild sparsity on text, which a step toward the dense model gives back.

The diagonal ignores how the biases of all units act together, so the full step overshoots by orders of
magnitude; the step length is therefore searched, on the held-out windows, from a step of 0.1% of the
largest unit's output RMS up, doubling until the held-out KL is well past its minimum. When no length beats
the plan itself by more than 1%, the plan comes back unchanged (``meta["bias_step"]`` says so). The biases
are folded into the adapters' output operands (``AdapterSpec.out_bias``), so they cost no FLOPs; thresholds
are then refitted on the held-out windows as for ``recover``. Cost: one forward and two backward passes over
``windows`` and a dozen forward passes over ``holdout``: seconds on a GPU, about 4 minutes for SmolLM2 (30
windows) on two CPU cores. Measured: benchmarks/RESULTS.md, the bias step.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ranapass.attach import FlopMeter, attach
from ranapass.evaluate import model_logits
from ranapass.hooks import forward_hooks
from ranapass.plan import Plan
from ranapass.recovery import (
    correctable_copy,
    correction_hooks,
    frozen,
    install_correction,
    mean_kl,
    output_rms,
)

__all__ = ["bias_step"]

log = logging.getLogger(__name__)

FIRST_STEP = 1e-3
"""The first step length tried: the largest unit's step RMS this fraction of its output RMS."""
MAX_DOUBLINGS = 12
"""The longest step tried is 2**11 times the first."""
OVERSHOOT = 1.5
"""The search stops at a step whose held-out KL is this many times the plan's: past the minimum for good. It
does not stop at the first rise, since the masks' hard thresholds make the held-out KL jitter by about 1% under
any small change (docs/quality.md)."""
MIN_GAIN = 0.01
"""A step is kept only if it lowers the held-out KL by this fraction of the plan's: less is that jitter."""
MIN_PLAN_KL = 0.06
"""No step for a plan whose held-out KL (nats per token) is under this. Such a plan is within about 1% of the
dense model's perplexity or below it (SmolLM2 from budget 0.8 up), and the step, which pulls toward the dense
model, lowered the KL there by a fifth but raised perplexity by 0.5-1% on every calibration draw and both
texts; from 0.7 down (held-out KL 0.08 and more) it lowered perplexity (benchmarks/RESULTS.md, the bias step)."""


def bias_step(model: torch.nn.Module, plan: Plan, windows: torch.Tensor, holdout: torch.Tensor, *,
              min_plan_kl: float = MIN_PLAN_KL, damping: float = 0.1, batch_size: int = 2, seed: int = 0,
              progress: bool = True) -> Plan:
    """A copy of ``plan`` whose adapters carry an output bias from one Gauss-Newton step, thresholds refitted.

    Args:
        model: the model ``plan`` was made for (a causal LM returning logits); left as it was.
        plan: the plan to correct (not modified). Units of a kind without an output operand stay as they are.
        windows: calibration token windows ``[N, L]`` the gradient and Fisher are measured on (not the
            evaluation text): the profile's windows less the held-out ones. With 8 of SmolLM2's 30 the step
            bought less at 0.56 than with all 30 (benchmarks/RESULTS.md).
        holdout: token windows ``[M, L]`` the step length is chosen and the thresholds refitted on
            (``Profile.holdout``).
        min_plan_kl: no step for a plan whose held-out KL (nats per token) is under this (:data:`MIN_PLAN_KL`).
        damping: added to each output's Fisher, as a fraction of its unit's mean Fisher.
        batch_size: windows per forward pass.
        seed: the sampled tokens of the Fisher pass.
        progress: show a tqdm bar.

    Example::

        >>> plan = profile.plan(0.56)  # doctest: +SKIP
        >>> train, holdout = split_holdout(calibration_windows(tokenizer), 2)  # doctest: +SKIP
        >>> plan = ranapass.bias_step(model, plan, train, holdout)  # doctest: +SKIP
    """
    if not damping > 0 or batch_size < 1:
        raise ValueError(f"damping ({damping}) must be positive and batch_size ({batch_size}) at least 1")
    corrected, units = correctable_copy(model, plan, windows, holdout)
    device = next(model.parameters()).device
    biases = {u.name: torch.zeros(u.adapter.out_total, device=device) for u in units}
    direction: dict[str, torch.Tensor] = {}
    with frozen(model):
        attachment = attach(model, corrected, check_fingerprint=False)
        hooks = correction_hooks(model, corrected, {name: (torch.ones_like(b), b) for name, b in biases.items()})

        def held_kl(alpha: float) -> float:
            for name, b in biases.items():
                b.copy_(alpha * direction[name] if alpha else torch.zeros_like(b))
            return mean_kl(model, attachment, hooks, holdout, batch_size)

        with FlopMeter() as meter:
            searched = [(0.0, held_kl(0.0))]
        kept_counts = {name: meter.mean_kept(name) for name in meter.tokens}
        if searched[0][1] >= min_plan_kl:
            grad, fisher = gradient_and_fisher(model, attachment, corrected, units, windows, batch_size, seed,
                                               progress)
            direction.update({name: -g / (fisher[name] + damping * fisher[name].mean()) for name, g in grad.items()})
            rms = output_rms(model, corrected, holdout[:batch_size].to(device))
            unit_step = max(float(d.pow(2).mean().sqrt()) / rms[name] for name, d in direction.items())
            alpha = FIRST_STEP / unit_step if unit_step > 0 else 0.0
            for _ in range(MAX_DOUBLINGS if alpha > 0 else 0):
                searched.append((alpha, held_kl(alpha)))
                if searched[-1][1] > OVERSHOOT * searched[0][1]:
                    break
                alpha *= 2
    best_alpha, best_kl = min(searched, key=lambda s: s[1])
    if not (searched[0][1] > 0 and best_kl < (1 - MIN_GAIN) * searched[0][1]):
        best_alpha = 0.0
    corrected.meta["bias_step"] = {"windows": int(windows.shape[0]), "min_plan_kl": min_plan_kl, "damping": damping,
                                   "seed": seed, "alpha": best_alpha, "searched": [list(s) for s in searched]}
    if searched[0][1] < min_plan_kl:
        log.info("no bias step: the plan's held-out KL (%.4g nats per token) is under %g, where a step toward the "
                 "dense model costs perplexity", searched[0][1], min_plan_kl)
        return corrected
    if best_alpha == 0.0:
        log.warning("no bias step lowered the held-out KL (%.4g nats per token without one) by %g%%: the plan is "
                    "returned without one", searched[0][1], 100 * MIN_GAIN)
        return corrected
    log.info("bias step: held-out KL %.4f -> %.4f nats per token", searched[0][1], best_kl)
    correction = {u.name: (torch.ones(u.adapter.out_total), best_alpha * direction[u.name].cpu()) for u in units}
    install_correction(model, corrected, correction, kept_counts, holdout)
    return corrected


def gradient_and_fisher(model: torch.nn.Module, attachment, plan: Plan, units: list, windows: torch.Tensor,
                        batch_size: int, seed: int, progress: bool
                        ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per unit, the mean over tokens of dKL(dense || adapted)/dy (its bias's gradient) and of (dNLL(s)/dy)^2
    for tokens s sampled from the adapted model (the diagonal Fisher), on ``windows``; ``y`` the unit's output."""
    device = next(model.parameters()).device
    names = {u.name for u in units}
    grad = {u.name: torch.zeros(u.adapter.out_total, device=device) for u in units}
    fisher = {u.name: torch.zeros(u.adapter.out_total, device=device) for u in units}
    members = [(u.name, path) for u in plan.adapted if u.name in names for path in u.members]
    outputs: dict[str, torch.Tensor] = {}

    def keep(path: str):
        def hook(_module, _args, out):
            if not out.requires_grad:  # the first units: nothing before them carries a gradient
                out = out.detach().requires_grad_(True)
            outputs[path] = out
            return out
        return hook

    hooks = [(model.get_submodule(path), keep(path)) for _, path in members]
    gen = torch.Generator(device=device).manual_seed(seed)
    tokens = 0
    for batch in tqdm(windows.split(batch_size), desc="bias step", unit="batch", disable=not progress):
        batch = batch.to(device)
        with torch.no_grad():
            dense = F.log_softmax(model_logits(model(batch)).float(), dim=-1)
        outputs.clear()
        with torch.enable_grad(), attachment.eager(), forward_hooks(hooks):
            adapted = F.log_softmax(model_logits(model(batch)).float(), dim=-1).flatten(0, -2)
            kl = F.kl_div(adapted, dense.flatten(0, -2), log_target=True, reduction="sum")
            outs = [outputs[path] for _, path in members]
            kl_grads = torch.autograd.grad(kl, outs, retain_graph=True)
            sampled = torch.multinomial(adapted.detach().exp(), 1, generator=gen)
            fisher_grads = torch.autograd.grad(-adapted.gather(1, sampled).sum(), outs)
        for name in names:
            grad[name] += torch.cat([g.float().flatten(0, -2).sum(0)
                                     for (n, _), g in zip(members, kl_grads) if n == name])
            fisher[name] += torch.cat([g.float().flatten(0, -2).pow(2).sum(0)
                                       for (n, _), g in zip(members, fisher_grads) if n == name])
        tokens += batch.numel()
    return {name: g / tokens for name, g in grad.items()}, {name: f / tokens for name, f in fisher.items()}
