"""Greedy generation whose prefill and decode steps both run through the adapted, compiled graph.

Hugging Face's own ``generate(..., compile_config=...)`` compiles the decode step only: its prefill
runs eagerly with the dense weights, so the tokens differ from the adapted model's. Here, as in
gpt-fast, two small functions are compiled with the ranapass backend (reference/compile.md §4):

- prefill: the whole prompt, with Dynamo's automatic dynamic shapes (a second prompt length makes
  the length symbolic; later lengths reuse that graph);
- decode: one token per call, static shapes, ``mode="reduce-overhead"`` (CUDA graphs) on CUDA.

Both write a ``StaticCache`` that is allocated eagerly once (so its tensors are static addresses for
CUDA graphs), then ``reset()`` in place before each prompt and reused: a fresh cache per prompt
would recompile, and one first allocated inside a compiled graph breaks CUDA graphs.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging

import torch

from ranapass.backend import RanaBackend, rana_backend, unrewritten_units
from ranapass.data import check_token_ids
from ranapass.fx_pass import RewriteError

__all__ = ["CompiledGenerator"]

log = logging.getLogger(__name__)


def _next_token(model: torch.nn.Module, input_ids: torch.Tensor, positions: torch.Tensor, cache,
                options: dict) -> torch.Tensor:
    """Greedy next token after ``input_ids`` ([B, L]) at ``positions`` ([L]): [B]."""
    kwargs = {options["cache_kwarg"]: cache, **options["extra"]}
    if options["cache_position"]:
        kwargs["cache_position"] = positions
    out = model(input_ids=input_ids, position_ids=positions[None], use_cache=True, **kwargs)
    return out.logits[:, -1].argmax(-1)


# Two functions, so Dynamo keeps a cache (and a compile count) for each phase.
def _prefill(model, input_ids, positions, cache, options):
    return _next_token(model, input_ids, positions, cache, options)


def _decode(model, input_ids, positions, cache, options):
    return _next_token(model, input_ids, positions, cache, options)


class CompiledGenerator:
    """Greedy decoding of a causal LM with an attached plan, prefill and decode compiled by ranapass.

    Prompts are batches of equal length (no padding). The first ``generate`` compiles; it then checks
    that every adapted unit of the model was rewritten in each prefill and decode graph, and raises
    ``RewriteError`` otherwise (generation must never silently run dense linears).

    Args:
        model: a Hugging Face causal LM with a plan attached (``ranapass.attach``).
        max_cache_len: room in the KV cache: prompt length + new tokens must fit.
        batch_size: the batch size every ``generate`` call uses.
        backend: the ranapass backend whose options apply (its reports are not touched: each phase
            records into its own copy, see ``prefill_backend`` and ``decode_backend``).
        decode_mode: torch.compile mode of the decode step; default "reduce-overhead" on CUDA, None
            (Inductor's default) elsewhere.

    Example::

        ranapass.attach(model, plan)
        gen = CompiledGenerator(model, max_cache_len=256)
        tokens = gen.generate(tokenizer("The Python interpreter", return_tensors="pt").input_ids, 32)
    """

    def __init__(self, model: torch.nn.Module, max_cache_len: int, *, batch_size: int = 1,
                 backend: RanaBackend = rana_backend, decode_mode: str | None = "auto"):
        from transformers import StaticCache

        self.model = model
        self.max_cache_len = max_cache_len
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        if decode_mode == "auto":
            decode_mode = "reduce-overhead" if self.device.type == "cuda" else None
        self.prefill_backend = dataclasses.replace(backend, reports=[])
        self.decode_backend = dataclasses.replace(backend, reports=[])
        self._prefill = torch.compile(_prefill, backend=self.prefill_backend, fullgraph=True)
        self._decode = torch.compile(_decode, backend=self.decode_backend, fullgraph=True, mode=decode_mode)
        self._cudagraphs = decode_mode in ("reduce-overhead", "max-autotune")
        # The forward's keywords differ across transformers versions (5.24 renamed past_key_values to
        # cache and dropped cache_position): read them off its signature.
        params = inspect.signature(model.forward).parameters
        self._options = {
            "cache_kwarg": "cache" if "cache" in params else "past_key_values",
            "cache_position": "cache_position" in params,
            "extra": {"logits_to_keep": 1} if "logits_to_keep" in params else {},
        }
        self.cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
        with torch.no_grad():  # allocate K/V eagerly: static addresses for CUDA graphs (compile.md §4.2)
            _next_token(model, torch.zeros(batch_size, 1, dtype=torch.long, device=self.device),
                        torch.zeros(1, dtype=torch.long, device=self.device), self.cache, self._options)
        self._checked = {"prefill": 0, "decode": 0}  # reports already checked, per phase

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int,
                 eos_token_id: int | None = None) -> torch.Tensor:
        """Prompt ``[B, L]`` followed by up to ``max_new_tokens`` greedy tokens: ``[B, L + new]``.

        With ``eos_token_id``, generation stops once every sequence has produced it, and finished
        sequences are padded with it.
        """
        check_token_ids(input_ids, self.model, "the prompt")
        batch, length = input_ids.shape
        if batch != self.batch_size:
            raise ValueError(f"this generator was built for batch size {self.batch_size}, got {batch}")
        if max_new_tokens < 1 or length + max_new_tokens > self.max_cache_len:
            raise ValueError(f"prompt {length} + {max_new_tokens} new tokens must fit max_cache_len "
                             f"{self.max_cache_len} (and max_new_tokens >= 1)")
        input_ids = input_ids.to(self.device)
        self.cache.reset()
        token = self._prefill(self.model, input_ids, torch.arange(length, device=self.device), self.cache,
                              self._options).clone()
        tokens = [token]
        done = token == eos_token_id if eos_token_id is not None else None
        position = torch.tensor([length], device=self.device)
        for _ in range(max_new_tokens - 1):
            if done is not None and bool(done.all()):
                break
            if self._cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            token = self._decode(self.model, token[:, None], position, self.cache, self._options).clone()
            if done is not None:
                token = torch.where(done, eos_token_id, token)
                done |= token == eos_token_id
            tokens.append(token)
            position += 1
        self.check()
        return torch.cat([input_ids, torch.stack(tokens, 1)], 1)

    def check(self) -> None:
        """Raise ``RewriteError`` unless every graph compiled so far rewrote every adapted unit of the model."""
        for phase, backend in (("prefill", self.prefill_backend), ("decode", self.decode_backend)):
            for i, report in enumerate(backend.reports[self._checked[phase]:], start=self._checked[phase]):
                missing = unrewritten_units(self.model, [report])
                if missing:
                    raise RewriteError(f"graph {i} of the compiled {phase} step left {len(missing)} adapted "
                                       f"unit(s) dense: {', '.join(missing)}\n{report.summary()}")
                log.info("ranapass: graph %d of the %s step rewrote all %d adapted units", i, phase, report.rewritten)
            self._checked[phase] = len(backend.reports)

    @property
    def compilations(self) -> dict[str, int]:
        """Graphs compiled so far per phase."""
        return {"prefill": len(self.prefill_backend.reports), "decode": len(self.decode_backend.reports)}
