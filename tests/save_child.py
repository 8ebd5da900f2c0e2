"""Saves for tests/io/test_files_atomic.py, and a child process that makes one of them stall to be SIGKILLed.

``python save_child.py KIND STAGE WORKDIR`` runs save ``KIND`` of :data:`SAVES` in WORKDIR (its cache is
WORKDIR/cache). User files (plan, lora) are first saved whole at version 0, then saved again at version 1
with the stall armed. STAGE ``writing`` stalls once the files are written under temporary names, before
any rename; ``renaming`` stalls right after the first file replaced its namesake. The child writes
WORKDIR/stalled when it stalls, and the test kills it there.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import tiny_llama, token_windows  # noqa: E402

PROFILE_OPTIONS = dict(sample_tokens=256, holdout_windows=2, gradient_windows=2)


def tiny_plan(version: int):
    """A plan for ``tiny_llama()``; versions differ in their thresholds."""
    from plans import build_plan

    model = tiny_llama()
    return build_plan(model, token_windows(2, length=16), keep=(0.5, 0.8)[version])


def tiny_lora(version: int):
    """A two-module LoRA adapter; versions differ in their factors."""
    from ranapass.lora import LoraAdapter
    from ranapass.lora.io import LoraFactors

    gen = torch.Generator().manual_seed(version)
    modules = [LoraFactors(n, f"base_model.model.{n}", False, torch.randn(4, 32, generator=gen),
                           torch.randn(48, 4, generator=gen), 1.0) for n in ("a", "b")]
    return LoraAdapter({"peft_type": "LORA", "r": 4, "lora_alpha": 4}, modules)


def tiny_profile(work: Path):
    """Profile ``tiny_llama()`` with its cache entry under ``work/cache``."""
    from ranapass.profiling import ProfileOptions, profile

    return profile(tiny_llama(), token_windows(8, length=32), options=ProfileOptions(**PROFILE_OPTIONS),
                   cache=work / "cache")


def fake_gguf(work: Path, tiny_dir: str) -> Path:
    """A stand-in .gguf file whose "dequantization" loads the tiny model in ``tiny_dir`` (patched loaders)."""
    import transformers

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        def fake(source, *args, gguf_file=None, _real=cls.from_pretrained, **kwargs):
            if gguf_file is None:
                return _real(source, *args, **kwargs)
            kwargs.pop("quantization_config", None)
            return _real(tiny_dir, *args, **kwargs)
        cls.from_pretrained = fake
    path = work / "tiny.gguf"
    if not path.exists():
        path.write_bytes(b"GGUF stand-in")
    return path


def prose_root(work: Path) -> Path:
    """A folder of HTML pages for the text cache."""
    root = work / "html"
    root.mkdir(exist_ok=True)
    for i in range(3):
        (root / f"page{i}.html").write_text(f"<p>Paragraph number {i} has more than five words in it.</p>")
    return root


def _stall(work: Path) -> None:
    (work / "stalled").write_text("stalled")
    time.sleep(600)


def _arm(stage: str, work: Path) -> None:
    from ranapass import manifest

    if stage == "writing":
        manifest._sync = lambda path: _stall(work)
    else:
        real = os.replace

        def replace(src, dst):
            real(src, dst)
            _stall(work)
        os.replace = replace


def main(kind: str, stage: str, work: Path, tiny_dir: str) -> None:
    os.environ["RANAPASS_CACHE"] = str(work / "cache")
    if kind in ("plan", "lora"):
        save = tiny_plan if kind == "plan" else tiny_lora
        save(0).save(work / kind)
        _arm(stage, work)
        save(1).save(work / kind)
        return
    _arm(stage, work)
    if kind == "profile":
        tiny_profile(work)
    elif kind == "model":
        from ranapass.models import load_model

        load_model(fake_gguf(work, tiny_dir))
    elif kind == "text":
        from ranapass.data import _cached_prose

        _cached_prose("pages", prose_root(work))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4])
