"""Shared fixtures: a tiny tokenizer and tiny random Llama built locally (no download), and text files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from architectures import tiny_llama

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Python is a programming language that lets you work quickly and integrate systems.",
    "A list comprehension consists of brackets containing an expression followed by a for clause.",
    "Exceptions are raised when errors are detected during execution of a program.",
    "The interpreter reads a line of input, evaluates it and prints the result.",
]


def synthetic_text(num_sentences: int, seed: int = 0) -> str:
    """Deterministic English-like text: sentences drawn from :data:`SENTENCES`."""
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(SENTENCES), (num_sentences,), generator=g).tolist()
    return " ".join(SENTENCES[i] for i in picks)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer (300 tokens) trained on :data:`SENTENCES`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def make_tiny_llama(vocab_size: int, *, tie: bool = False, seed: int = 0):
    """A random 2-layer Llama with GQA (4 heads, 2 KV heads), hidden 32, MLP 48, float32, eval mode."""
    return tiny_llama(seed, hidden=32, intermediate=48, vocab=vocab_size, tie=tie)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A folder holding a tiny random Llama and :func:`tiny_tokenizer`, as save_pretrained writes them."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama(len(tiny_tokenizer)).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def text_dir(tmp_path) -> Path:
    """Three plain text files (one in a sub-folder) and one file that is not text."""
    (tmp_path / "sub").mkdir()
    for i, name in enumerate(["a.txt", "b.md", "sub/c.txt"]):
        (tmp_path / name).write_text(synthetic_text(40, seed=i), encoding="utf-8")
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    return tmp_path


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch) -> Path:
    """Point ``RANAPASS_CACHE`` at an empty folder for one test."""
    path = tmp_path / "cache"
    monkeypatch.setenv("RANAPASS_CACHE", str(path))
    return path


@pytest.fixture(scope="session")
def smollm2():
    """The real default model and tokenizer (dequantized once, then loaded from the ranapass cache)."""
    from ranapass.models import load_model

    return load_model()


@pytest.fixture(scope="session")
def smollm2_profile(smollm2):
    """A real profile of SmolLM2, kept small for CI: 12 calibration windows of 256 tokens (2 held out for
    the thresholds), Fisher weights from 4 of them. About 2.5 minutes on a quiet 2-core machine, 80 s of it the
    candidate curves, which do not shrink with the windows."""
    import ranapass
    from ranapass.data import calibration_windows

    model, tokenizer = smollm2
    windows = calibration_windows(tokenizer, num_windows=12, window=256)
    return ranapass.profile(model, windows, options=ranapass.ProfileOptions(gradient_windows=4), cache=False)
