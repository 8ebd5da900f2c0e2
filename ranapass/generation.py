"""Greedy generation whose prefill and decode steps both run through the compiled graph, adapted or dense.

As in gpt-fast, two small functions are compiled (reference/compile.md §4):

- prefill: the whole prompt, with Dynamo's automatic dynamic shapes (a second prompt length makes
  the length symbolic; later lengths reuse that graph), Inductor's default mode unless
  ``prefill_mode`` asks for CUDA graphs;
- decode: one token per call, static shapes, ``mode="reduce-overhead"`` (CUDA graphs) on CUDA.

Both write a ``StaticCache`` that is allocated eagerly once (so its tensors are static addresses for
CUDA graphs), then ``reset()`` in place before each prompt and reused: a fresh cache per prompt
would recompile, and one first allocated inside a compiled graph breaks CUDA graphs.

A model with a plan attached runs through the ranapass backend; a model with none runs through the
backend's compiler alone (no rewrite), with the same mode and cache: the dense baseline, measured the
same way.

Hugging Face's own ``generate``
-------------------------------
``model.generate(..., cache_implementation="static", compile_config=CompileConfig(backend=...))``
compiles the decode step only: its prefill calls the model eagerly, with the dense weights, so the
tokens mix a dense prefill with an adapted decode and differ from the adapted model's. With
``prefill_chunk_size`` (transformers 5) the prefill goes through the same compiled call, chunk by
chunk, and every token is adapted; transformers then also allocates the static cache eagerly, as
CUDA graphs need. On a CPU, ``generate`` compiles nothing unless the config's private flag
``_compile_all_devices`` is set. So, with a plan attached::

    config = CompileConfig(backend=ranapass.rana_backend)   # or backend="rana", the entry point
    config._compile_all_devices = True                     # CPU only
    model.generate(ids, cache_implementation="static", compile_config=config,
                   prefill_chunk_size=ids.shape[1], max_new_tokens=32, do_sample=False)
    ranapass.rana_backend.check(model)                      # every adapted unit was rewritten

Each new ``max_new_tokens`` resizes the cache and recompiles; ``CompiledGenerator`` keeps one cache.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

from ranapass.attach import attachment_of
from ranapass.backend import RanaBackend, rana_backend, unrewritten_units
from ranapass.data import check_token_ids
from ranapass.errors import RanapassError
from ranapass.fx_pass import RewriteError
from ranapass.plan import Plan

__all__ = ["CompiledGenerator", "GenerationTiming"]

log = logging.getLogger(__name__)

_CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that record CUDA graphs


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


@dataclasses.dataclass(eq=False)
class _DenseCompiler:
    """Compiles each graph as ``backend`` would, without the rewrite, and counts the graphs."""

    backend: RanaBackend
    graphs: int = 0

    @property
    def __name__(self) -> str:  # torch._dynamo names backends by their __name__
        return f"dense_{self.backend.compiler}"

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], mode: str | None = None,
                 options: dict[str, Any] | None = None) -> Callable[..., Any]:
        self.graphs += 1
        return self.backend._compile(gm, example_inputs, mode, dict(options or {}))


@dataclasses.dataclass(frozen=True)
class GenerationTiming:
    """Wall-clock seconds of one ``generate`` call, the device synchronised at each phase's end.

    ``new_tokens`` counts the tokens generated per sequence: the first comes from the prefill, the
    others from the ``new_tokens - 1`` decode steps. ``prefill_launch_seconds`` is the part of the
    prefill until the compiled call handed control back, its kernels queued but not yet run: close to
    ``prefill_seconds`` when the host, not the device, sets the prefill's pace.
    """

    batch: int
    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float
    decode_seconds: float
    prefill_launch_seconds: float = math.nan

    @property
    def prefill_tokens_per_s(self) -> float:
        """Prompt tokens (all sequences) per second of prefill."""
        return self.batch * self.prompt_tokens / self.prefill_seconds

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens (all sequences) per second of decode steps; NaN when there were none."""
        steps = self.new_tokens - 1
        return self.batch * steps / self.decode_seconds if steps > 0 else math.nan


class CompiledGenerator:
    """Greedy decoding of a causal LM, prefill and decode compiled: adapted when a plan is attached, else dense.

    Prompts are batches of equal length (no padding). The generator is bound to the plan attached
    when it is built (or to none): ``generate`` refuses to run once another plan (or none) is
    attached. With a plan, the first ``generate`` compiles and then checks that every adapted unit
    was rewritten in each prefill and decode graph, raising ``RewriteError`` otherwise (generation
    must never silently run dense linears). With no plan, the graphs go to the backend's compiler
    unchanged, with the same mode and cache: the dense baseline of the same harness.

    Args:
        model: a Hugging Face causal LM, with a plan attached (``ranapass.attach``) or not.
        max_cache_len: room in the KV cache: prompt length + new tokens must fit.
        batch_size: the batch size every ``generate`` call uses.
        backend: the ranapass backend whose options (and compiler) apply; its reports are not touched:
            each phase records into its own copy, see ``prefill_backend`` and ``decode_backend``.
        decode_mode: torch.compile mode of the decode step; default "reduce-overhead" on CUDA, None
            (Inductor's default) elsewhere.
        prefill_mode: torch.compile mode of the prefill; default None (no CUDA graphs: a prompt's
            kernels are launched one by one). "reduce-overhead" records a CUDA graph per prompt length,
            which takes the host's launch time off prompts short enough for it to matter, at the cost
            of a recording (and graph memory) per new length.

    Attributes:
        last_timing: the ``GenerationTiming`` of the latest ``generate`` call (None before the first).

    Example::

        ranapass.attach(model, plan)
        gen = CompiledGenerator(model, max_cache_len=256)
        tokens = gen.generate(tokenizer("The Python interpreter", return_tensors="pt").input_ids, 32)
        print(gen.last_timing.decode_tokens_per_s)
    """

    def __init__(self, model: torch.nn.Module, max_cache_len: int, *, batch_size: int = 1,
                 backend: RanaBackend = rana_backend, decode_mode: str | None = "auto",
                 prefill_mode: str | None = None):
        from transformers import StaticCache

        self.model = model
        self.max_cache_len = max_cache_len
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        self.plan = _plan_of(model)
        if decode_mode == "auto":
            decode_mode = "reduce-overhead" if self.device.type == "cuda" else None
        if self.plan is not None:
            self.prefill_backend = dataclasses.replace(backend, reports=[])
            self.decode_backend = dataclasses.replace(backend, reports=[])
        else:
            self.prefill_backend, self.decode_backend = _DenseCompiler(backend), _DenseCompiler(backend)
        self._prefill = torch.compile(_prefill, backend=self.prefill_backend, fullgraph=True, mode=prefill_mode)
        self._decode = torch.compile(_decode, backend=self.decode_backend, fullgraph=True, mode=decode_mode)
        self._cudagraphs = {phase: mode in _CUDAGRAPH_MODES and self.device.type == "cuda"
                            for phase, mode in (("prefill", prefill_mode), ("decode", decode_mode))}
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
        self.last_timing: GenerationTiming | None = None

    @property
    def adapted(self) -> bool:
        """True when the generator runs the model's attached plan, False for the dense baseline."""
        return self.plan is not None

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None,
                 progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """Prompt ``[B, L]`` followed by up to ``max_new_tokens`` greedy tokens: ``[B, L + new]``.

        With ``eos_token_id``, generation stops once every sequence has produced it, and finished
        sequences are padded with it. ``progress``, if given, is called with the number of tokens
        generated so far after each step (it must not read the tokens: that would wait for the device).
        """
        check_token_ids(input_ids, self.model, "the prompt")
        batch, length = input_ids.shape
        if batch != self.batch_size:
            raise RanapassError(f"this generator was built for batch size {self.batch_size}, got {batch}")
        if max_new_tokens < 1 or length + max_new_tokens > self.max_cache_len:
            raise RanapassError(f"prompt {length} + {max_new_tokens} new tokens must fit max_cache_len "
                                f"{self.max_cache_len} (and max_new_tokens >= 1)")
        if _plan_of(self.model) is not self.plan:
            raise RanapassError("the model's attached plan changed since this generator was built: build a new "
                                "CompiledGenerator for the model as it is now")
        input_ids = input_ids.to(self.device)
        start = time.perf_counter()
        self.cache.reset()
        if self._cudagraphs["prefill"]:
            torch.compiler.cudagraph_mark_step_begin()
        token = self._prefill(self.model, input_ids, torch.arange(length, device=self.device), self.cache,
                              self._options).clone()
        launched = time.perf_counter()
        self._synchronize()
        prefilled = time.perf_counter()
        tokens = [token]
        if progress is not None:
            progress(1)
        done = token == eos_token_id if eos_token_id is not None else None
        position = torch.tensor([length], device=self.device)
        for _ in range(max_new_tokens - 1):
            if done is not None and bool(done.all()):
                break
            if self._cudagraphs["decode"]:
                torch.compiler.cudagraph_mark_step_begin()
            token = self._decode(self.model, token[:, None], position, self.cache, self._options).clone()
            if done is not None:
                token = torch.where(done, eos_token_id, token)
                done |= token == eos_token_id
            tokens.append(token)
            position += 1
            if progress is not None:
                progress(len(tokens))
        self._synchronize()
        self.last_timing = GenerationTiming(batch, length, len(tokens), prefilled - start,
                                            time.perf_counter() - prefilled, launched - start)
        self.check()
        return torch.cat([input_ids, torch.stack(tokens, 1)], 1)

    def check(self) -> None:
        """Raise ``RewriteError`` unless every graph compiled so far rewrote every adapted unit of the plan."""
        if self.plan is None:
            return
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
        if self.plan is None:
            return {"prefill": self.prefill_backend.graphs, "decode": self.decode_backend.graphs}
        return {"prefill": len(self.prefill_backend.reports), "decode": len(self.decode_backend.reports)}

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _plan_of(model: torch.nn.Module) -> Plan | None:
    attachment = attachment_of(model)
    return attachment.plan if attachment is not None else None
