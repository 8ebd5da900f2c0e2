"""The one factory of tiny random-weight models for the tests: built from configs (no download), float32,
eval mode, seeded, a few seconds each at most.

``build(family, seed=0)`` makes one model of a family of :data:`FAMILIES` (HF architectures: decoders,
an encoder, a ViT, mixtures of experts); ``batches(family, n, length)`` makes inputs it accepts
(token windows ``[n, length]`` for the language models, a list of input dicts for the others) and
``Family.loss_fn`` is the loss a profile needs for the models that are not causal LMs. ``tiny_llama``
and ``token_windows`` are the small Llama and token windows most tests use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["Family", "FAMILIES", "MOE", "build", "batches", "output", "tiny_llama", "token_windows"]

VOCAB = 128
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
"""Common config of the decoder families: GQA (4 query heads of 16, 2 KV heads), a gated MLP of 128."""
GPT = dict(vocab_size=VOCAB, n_embd=64, n_inner=128, n_layer=2, n_head=4, n_positions=128, bos_token_id=1,
           eos_token_id=2)
"""The same sizes in GPT-2's config names (GPT-J, GPT-BigCode, BLOOM use them too)."""
FALCON = {**BASE, "intermediate_size": None, "num_key_value_heads": None, "max_position_embeddings": None,
          "ffn_hidden_size": 128, "bias": False}
IMAGE = dict(image_size=16, patch_size=4, num_channels=3, num_labels=10)


@dataclasses.dataclass(frozen=True)
class Family:
    """A family of models: how to build a tiny one and how to feed it.

    Args:
        name: short name, the test id.
        arch: the transformers class name.
        config: config keyword arguments for that class's config.
        kind: "causal_lm" (token windows, the default LM loss), "masked_lm" (token windows, a
            reconstruction loss through ``loss_fn``) or "image" (pixel dicts, classification loss).
        moe: the MLPs are mixtures of experts (3D expert parameters).
    """

    name: str
    arch: str
    config: dict[str, Any]
    kind: str = "causal_lm"
    moe: bool = False

    @property
    def loss_fn(self) -> Callable[[torch.nn.Module, Any], torch.Tensor] | None:
        """The ``loss_fn(model, batch)`` for ``ranapass.profile``: None for causal LMs (the default loss)."""
        return {"masked_lm": _reconstruction_loss, "image": _classification_loss}.get(self.kind)


def _decoder(name: str, arch: str, base: dict[str, Any] = BASE, moe: bool = False, **overrides: Any) -> Family:
    """A decoder family: ``base`` config with ``overrides`` (None drops a key)."""
    config = {k: v for k, v in {**base, **overrides}.items() if v is not None}
    return Family(name, arch, config, moe=moe)


FAMILIES: dict[str, Family] = {f.name: f for f in [
    _decoder("llama", "LlamaForCausalLM"),
    _decoder("mistral", "MistralForCausalLM", sliding_window=None),
    _decoder("qwen2", "Qwen2ForCausalLM"),
    _decoder("qwen3", "Qwen3ForCausalLM", head_dim=16),
    _decoder("gemma", "GemmaForCausalLM", head_dim=16),
    _decoder("gemma2", "Gemma2ForCausalLM", head_dim=16, sliding_window=64),
    _decoder("gemma3", "Gemma3ForCausalLM", head_dim=16, sliding_window=64),
    _decoder("phi3", "Phi3ForCausalLM", pad_token_id=0),  # fused qkv_proj and gate_up_proj
    _decoder("gpt2", "GPT2LMHeadModel", GPT),  # Conv1D
    _decoder("gptj", "GPTJForCausalLM", GPT, rotary_dim=8),
    _decoder("gpt_neox", "GPTNeoXForCausalLM", num_key_value_heads=None, rotary_pct=0.5,
             use_parallel_residual=True),
    _decoder("gpt_bigcode", "GPTBigCodeForCausalLM", GPT, multi_query=True),
    _decoder("falcon", "FalconForCausalLM", FALCON, new_decoder_architecture=False, multi_query=True,
             parallel_attn=True),
    _decoder("falcon_new", "FalconForCausalLM", FALCON, new_decoder_architecture=True, num_kv_heads=2),
    _decoder("bloom", "BloomForCausalLM", GPT, hidden_size=32, n_embd=None, n_inner=None,
             n_positions=None),  # the MLP is 4 x hidden
    _decoder("opt", "OPTForCausalLM", intermediate_size=None, num_key_value_heads=None, ffn_dim=128,
             word_embed_proj_dim=64),
    _decoder("olmo2", "Olmo2ForCausalLM"),
    _decoder("granite", "GraniteForCausalLM"),
    _decoder("stablelm", "StableLmForCausalLM"),
    _decoder("cohere", "CohereForCausalLM"),
    Family("bert", "BertForMaskedLM", dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                           num_hidden_layers=2, num_attention_heads=4,
                                           max_position_embeddings=128), kind="masked_lm"),
    Family("vit", "ViTForImageClassification", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                    num_attention_heads=4, **IMAGE), kind="image"),
    _decoder("mixtral", "MixtralForCausalLM", moe=True, sliding_window=None, num_local_experts=4,
             num_experts_per_tok=2),
    _decoder("qwen3_moe", "Qwen3MoeForCausalLM", moe=True, head_dim=16, num_experts=4, num_experts_per_tok=2,
             moe_intermediate_size=64, decoder_sparse_step=1),
    _decoder("olmoe", "OlmoeForCausalLM", moe=True, num_experts=4, num_experts_per_tok=2),
]}

MOE = [name for name, f in FAMILIES.items() if f.moe]
"""Families whose MLPs are mixtures of experts."""


def build(family: str | Family, seed: int = 0) -> torch.nn.Module:
    """A tiny random-weight model of ``family`` (a name of :data:`FAMILIES`), float32, eval mode."""
    import transformers

    fam = FAMILIES[family] if isinstance(family, str) else family
    cls = getattr(transformers, fam.arch)
    config_cls = transformers.Gemma3TextConfig if fam.arch == "Gemma3ForCausalLM" else cls.config_class
    config = config_cls(**fam.config)
    torch.manual_seed(seed)
    return cls(config).to(torch.float32).eval()


def batches(family: str | Family, n: int = 8, length: int = 32, seed: int = 0) -> Any:
    """Inputs for ``family``: token windows ``[n, length]`` for language models; for images a list of
    ``n // 4`` dicts of 4 images (``pixel_values`` and ``labels``)."""
    fam = FAMILIES[family] if isinstance(family, str) else family
    if fam.kind != "image":
        return token_windows(n, length, vocab=fam.config["vocab_size"], seed=seed)
    g = torch.Generator().manual_seed(seed)
    side, labels = fam.config["image_size"], fam.config["num_labels"]
    return [{"pixel_values": torch.randn(4, fam.config["num_channels"], side, side, generator=g),
             "labels": torch.randint(0, labels, (4,), generator=g)} for _ in range(max(1, n // 4))]


def output(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """The model's logits on one batch (token ids or an input dict)."""
    out = model(**batch) if isinstance(batch, dict) else model(input_ids=batch)
    return out.logits


def _reconstruction_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Masked-LM loss without masking: predict every token of the window (summed)."""
    logits = model(input_ids=batch).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch.reshape(-1), reduction="sum")


def _classification_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Image classification loss on the batch's labels (summed)."""
    logits = model(pixel_values=batch["pixel_values"]).logits
    return F.cross_entropy(logits.float(), batch["labels"], reduction="sum")


# ---------------------------------------------------------------------------------------- the small Llama
def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 64, intermediate: int = 160, vocab: int = 256,
               *, tie: bool = False) -> torch.nn.Module:
    """A GQA Llama (4 heads, 2 KV heads; default q 64, k/v 32 wide) with bos 1 and eos 2, in eval mode."""
    fam = _decoder("llama", "LlamaForCausalLM", vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                   num_hidden_layers=layers, max_position_embeddings=256, tie_word_embeddings=tie)
    return build(fam, seed)


def token_windows(n: int, length: int = 64, vocab: int = 256, seed: int = 0) -> torch.Tensor:
    """Random token windows: enough for calibration statistics of the tiny models."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g)
