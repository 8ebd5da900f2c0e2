"""Perplexity of a causal LM on fixed token windows, under one written protocol.

The evaluation protocol (what ``ranapass eval`` and ``ranapass demo`` report):

- text: the *evaluation* split of ``python-docs`` (:mod:`ranapass.data`: the prose of the pages
  under ``tutorial/``, ``howto/`` and ``faq/`` of Python's HTML docs; no page is also used for
  calibration);
- windows: 32 windows of 512 tokens, non-overlapping, evenly spaced over the evaluation token
  stream: window i starts at token ``floor(i * (L - 512) / 31)`` of the L-token stream (pages
  tokenized one by one without special tokens, joined by the tokens of ``"\n\n"``; see
  :func:`ranapass.data.token_windows`);
- scoring: every window is scored on its 511 next-token predictions (token t+1 given tokens 0..t of
  the same window; the first token of a window is context only), 32 x 511 = 16,352 tokens in all;
- perplexity = ``exp(mean NLL)`` over all scored tokens, NLL computed in float32 and summed in
  float64. The batch size only changes speed (and float rounding in the last digits).
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ranapass.attach import FlopMeter, temporarily_attached
from ranapass.data import check_token_ids
from ranapass.plan import Plan
from ranapass.plan_check import check_plan_fits

__all__ = ["EVAL_WINDOW", "EVAL_NUM_WINDOWS", "EVAL_SOURCE", "PerplexityResult", "AdaptedResult", "perplexity",
           "model_logits", "adapted_perplexity", "protocol"]

log = logging.getLogger(__name__)

EVAL_SOURCE = "python-docs"
EVAL_WINDOW = 512
EVAL_NUM_WINDOWS = 32


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    """Perplexity over ``tokens`` scored next-token predictions; ``nll`` is their mean, in nats.

    ``window_nll`` holds each window's mean NLL, in window order: two models scored on the same windows
    can then be compared by a paired difference, whose noise is far smaller than each mean's.
    """

    ppl: float
    nll: float
    tokens: int
    window_nll: tuple[float, ...] = ()


def protocol(source: str = EVAL_SOURCE, num_windows: int = EVAL_NUM_WINDOWS, window: int = EVAL_WINDOW) -> str:
    """One line describing an evaluation run, printed beside every perplexity."""
    return (f"{source} evaluation split, {num_windows} non-overlapping windows of {window} tokens evenly "
            f"spaced over the token stream, {window - 1} next-token predictions scored per window, "
            f"ppl = exp(mean NLL over {num_windows * (window - 1)} tokens)")


def model_logits(output) -> torch.Tensor:
    """Logits from a Hugging Face output, a tuple whose first item is the logits, or a tensor."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 4, *,
               progress: bool = True) -> PerplexityResult:
    """Perplexity of ``model`` on token windows, each scored on its ``window - 1`` next-token predictions.

    The model is called as ``model(input_ids)`` on batches of windows and must return logits
    ``[batch, window, vocab]`` (or an output with ``.logits``). The loss is computed one window
    at a time in float32, so only one window's float32 logits exist beside the model's own.

    Args:
        model: a causal LM (any ``nn.Module`` mapping token ids to logits).
        windows: LongTensor ``[num_windows, window]`` (see :func:`ranapass.data.token_windows`).
        batch_size: windows per forward pass.
        progress: show a tqdm bar.

    Returns:
        :class:`PerplexityResult`.

    Example::

        >>> windows = evaluation_windows(tokenizer)  # doctest: +SKIP
        >>> perplexity(model, windows).ppl  # doctest: +SKIP
    """
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [num_windows, window >= 2], got shape {tuple(windows.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_token_ids(windows, model, "evaluation windows")
    device = next(model.parameters()).device
    total_nll = 0.0  # float64 on the host: the sum does not depend on the batch size
    total_tokens = 0
    window_nll = []
    with tqdm(total=len(windows), desc="perplexity", unit="window", disable=not progress) as bar:
        for batch in windows.split(batch_size):
            batch = batch.to(device)
            logits = model_logits(model(batch))
            for row_logits, row in zip(logits, batch, strict=True):
                nll = float(F.cross_entropy(row_logits[:-1].float(), row[1:], reduction="sum"))
                total_nll += nll
                total_tokens += row.numel() - 1
                window_nll.append(nll / (row.numel() - 1))
            del logits
            bar.update(len(batch))
    mean = total_nll / total_tokens
    if not math.isfinite(mean):
        log.warning("the mean NLL is %s: the model produced non-finite logits", mean)
    return PerplexityResult(ppl=_exp(mean), nll=mean, tokens=total_tokens, window_nll=tuple(window_nll))


@dataclasses.dataclass(frozen=True)
class AdaptedResult:
    """Perplexity of the eagerly adapted model and the FLOPs its real masks cost on the same windows.

    ``flop_ratio`` is measured FLOPs over dense FLOPs of the block linears (cost_model/flops.py);
    ``flops_per_token`` the measured block-linear FLOPs per token.
    """

    perplexity: PerplexityResult
    flop_ratio: float
    flops_per_token: float
    expected_ratio: float


def adapted_perplexity(model: torch.nn.Module, plan: Plan, windows: torch.Tensor, batch_size: int = 4, *,
                       progress: bool = True) -> AdaptedResult:
    """Perplexity of ``model`` running ``plan`` eagerly, with FLOPs measured from the masks it applies.

    The plan is attached for the call and detached afterwards (a previous attachment is restored).
    Raises ``PlanMismatchError``, before any forward pass, if ``plan`` was made for other weights.

    Example::

        >>> plan = profile.plan(budget=0.56)  # doctest: +SKIP
        >>> r = adapted_perplexity(model, plan, evaluation_windows(tokenizer))  # doctest: +SKIP
        >>> r.perplexity.ppl, r.flop_ratio  # doctest: +SKIP
    """
    check_plan_fits(model, plan)
    with temporarily_attached(model, plan), FlopMeter() as meter:
        result = perplexity(model, windows, batch_size, progress=progress)
    return AdaptedResult(result, meter.ratio(plan), meter.flops(plan), plan.expected_ratio())


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf
