"""LoRA adapters as PEFT writes them: read a folder or a ``PeftModel``, write a folder PEFT loads as it is.

A module's update is ``ΔW = scale · B A`` (A ``[r, n]``, B ``[m, r]``), with ``scale`` = lora_alpha / r,
or lora_alpha / sqrt(r) with rsLoRA; ``alpha_pattern`` overrides lora_alpha per module.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from safetensors.torch import save_file

from ranapass.errors import RanapassError
from ranapass.manifest import MANIFEST, DamagedFileError, verify, write_folder
from ranapass.storage import load_json, load_tensors

if TYPE_CHECKING:
    from peft import PeftModel

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "AdapterFolderError", "LoraAdapter", "LoraFactors", "compressed_config",
           "load_lora"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# The key of an adapted module's A factor: <prefix>.lora_A.weight (Linear) or <prefix>.lora_embedding_A.
_A_KEY = re.compile(r"^(?P<prefix>.+)\.(?:(?P<linear>lora_A)\.weight|(?P<embedding>lora_embedding_A))$")
_PEFT_PREFIX = "base_model.model."
_DEFAULT_ALPHA = 8  # PEFT's default lora_alpha

Target = Literal["params", "flops"]


class AdapterFolderError(RanapassError, FileNotFoundError):
    """A PEFT adapter folder lacks one of its files."""


@dataclasses.dataclass
class LoraFactors:
    """One adapted module: ``ΔW = scale · B @ A``.

    Args:
        name: module path in the base model (``model.layers.0.self_attn.q_proj``).
        key: prefix of its tensors in the adapter state dict (``base_model.model.<name>``).
        embedding: True for an embedding LoRA (``lora_embedding_A/B``, ΔW applied transposed).
        A: ``[r, n]``.
        B: ``[m, r]``.
        scale: lora_alpha / r (or / sqrt(r) with rsLoRA).
    """

    name: str
    key: str
    embedding: bool
    A: torch.Tensor
    B: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """(m, n) of ``B @ A``."""
        return self.B.shape[0], self.A.shape[1]

    def cost_per_rank(self, target: Target) -> int:
        """Parameters per rank (m + n), or FLOPs per token per rank (2(m + n); an embedding's A is a lookup)."""
        m, n = self.shape
        if target == "params":
            return m + n
        return 2 * m if self.embedding else 2 * (m + n)

    def delta(self) -> torch.Tensor:
        """``scale · B @ A`` in float64 (``[m, n]``); for tests and small modules only."""
        return self.scale * (self.B.double() @ self.A.double())

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.embedding:
            return {f"{self.key}.lora_embedding_A": self.A, f"{self.key}.lora_embedding_B": self.B}
        return {f"{self.key}.lora_A.weight": self.A, f"{self.key}.lora_B.weight": self.B}


@dataclasses.dataclass
class LoraAdapter:
    """A LoRA adapter as PEFT saves it: its config, its factors per module, and tensors carried unchanged.

    Args:
        config: the ``adapter_config.json`` contents.
        modules: the adapted modules, sorted by name (numbers in numeric order).
        extra: other tensors of the state dict (``modules_to_save``, saved embedding layers), kept as they are.
    """

    config: dict[str, Any]
    modules: list[LoraFactors]
    extra: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    @property
    def num_parameters(self) -> int:
        """LoRA parameters: Σ r·(m + n) over the adapted modules."""
        return sum(f.rank * sum(f.shape) for f in self.modules)

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = dict(self.extra)
        for f in self.modules:
            out.update(f.state_dict())
        return out

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors``, the folder PEFT loads, atomically
        and with a manifest of their sizes and hashes (``load_lora`` checks it)."""
        out = Path(out_dir)
        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        config = json.dumps(self.config, indent=2, sort_keys=True) + "\n"
        with write_folder(out) as staging:
            save_file(tensors, staging / WEIGHTS_NAME, metadata={"format": "pt"})
            (staging / CONFIG_NAME).write_text(config)
        return out


def load_lora(source: str | os.PathLike | PeftModel, adapter_name: str = "default") -> LoraAdapter:
    """Read a LoRA adapter: a PEFT adapter folder, or an in-memory ``PeftModel`` (needs ``peft``).

    Args:
        source: a folder holding ``adapter_config.json`` and ``adapter_model.safetensors``, or a ``PeftModel``.
        adapter_name: which adapter of a ``PeftModel`` to read.

    Example::

        adapter = ranapass.load_lora("my-adapter")
        print(adapter.num_parameters)
    """
    if isinstance(source, (str, os.PathLike)):
        return _read_folder(Path(source))
    if not hasattr(source, "peft_config"):
        raise TypeError(f"expected an adapter folder or a peft.PeftModel, got {type(source).__name__}")
    from peft import get_peft_model_state_dict

    if adapter_name not in source.peft_config:
        raise KeyError(f"the PeftModel has no adapter {adapter_name!r} (it has {sorted(source.peft_config)})")
    config = _jsonable(source.peft_config[adapter_name].to_dict())
    tensors = get_peft_model_state_dict(source, adapter_name=adapter_name)
    return _from_state_dict(config, {k: v.detach().clone() for k, v in tensors.items()})


def _read_folder(folder: Path) -> LoraAdapter:
    """The adapter in a PEFT folder; its manifest, when it has one (ranapass wrote it), is checked first."""
    if not (folder / CONFIG_NAME).is_file():
        raise AdapterFolderError(f"{folder} is not a PEFT adapter folder: {CONFIG_NAME} is missing")
    if not (folder / WEIGHTS_NAME).is_file():
        hint = " (only safetensors is read: re-save it with save_pretrained(safe_serialization=True))" \
            if (folder / "adapter_model.bin").is_file() else ""
        raise AdapterFolderError(f"{folder / WEIGHTS_NAME} is missing{hint}")
    remedy = "save the adapter again"
    try:
        verify(folder, required=False)
    except DamagedFileError as e:
        raise DamagedFileError(f"{e}: {remedy} (if its files were replaced on purpose, delete {MANIFEST})") from e
    config = load_json(folder / CONFIG_NAME, remedy)
    if not isinstance(config, dict):
        raise RanapassError(f"{folder / CONFIG_NAME} holds {type(config).__name__}, not a PEFT config object: {remedy}")
    return _from_state_dict(config, load_tensors(folder / WEIGHTS_NAME, remedy))


def compressed_config(config: dict[str, Any], kept: dict[str, int], dropped: bool) -> dict[str, Any]:
    """``config`` with the new per-module ranks and alpha = rank per module (the scale is folded into the factors).

    Pattern keys are full module paths, PEFT's documented form: older PEFT looks them up as exact
    names, newer PEFT as regexes on a dotted suffix, which a full path matches for that module only.
    ``dropped``: some modules were left at rank 0, so ``target_modules`` lists the kept ones.
    """
    out = dict(config)
    top = max(kept.values())
    out.update(r=top, lora_alpha=top, rank_pattern=dict(kept), alpha_pattern=dict(kept), use_rslora=False)
    if dropped:
        out["target_modules"] = sorted(kept)
    return out


def _from_state_dict(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> LoraAdapter:
    _check_config(config)
    if any(".lora_magnitude_vector" in k for k in tensors):
        raise RanapassError("cannot compress this adapter: it holds DoRA magnitude vectors (lora_magnitude_vector)")
    alpha = config.get("lora_alpha", _DEFAULT_ALPHA)
    alpha_pattern = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora", False))
    used: set[str] = set()
    modules = []
    for key, A in tensors.items():
        match = _A_KEY.match(key)
        if match is None:
            continue
        prefix, embedding = match["prefix"], match["embedding"] is not None
        b_key = f"{prefix}.lora_embedding_B" if embedding else f"{prefix}.lora_B.weight"
        if b_key not in tensors:
            raise RanapassError(f"adapter tensor {key} has no matching {b_key}")
        B = tensors[b_key]
        if A.ndim != 2 or B.ndim != 2 or B.shape[1] != A.shape[0]:
            raise RanapassError(f"cannot compress {prefix}: expected A [r, n] and B [m, r], got "
                                f"{tuple(A.shape)} and {tuple(B.shape)} (convolution LoRA is not supported)")
        name = prefix.removeprefix(_PEFT_PREFIX)
        r = A.shape[0]
        a = _pattern_value(alpha_pattern, name, alpha)
        modules.append(LoraFactors(name, prefix, embedding, A, B, a / math.sqrt(r) if rslora else a / r))
        used.update((key, b_key))
    if not modules:
        raise RanapassError("the adapter holds no LoRA factors (no '*.lora_A.weight' or '*.lora_embedding_A' "
                            "tensor)")
    modules.sort(key=lambda f: _natural_key(f.name))
    extra = {k: v for k, v in tensors.items() if k not in used}
    return LoraAdapter(dict(config), modules, extra)


def _check_config(config: dict[str, Any]) -> None:
    """Refuse what truncating ``B A`` cannot compress faithfully."""
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise RanapassError(f"not a LoRA adapter: peft_type is {config.get('peft_type')!r}")
    unsupported = {
        "use_dora": "DoRA rescales each column by a learned magnitude, so truncating B·A does not truncate the update",
        "lora_bias": "a LoRA bias on lora_B",
        "target_parameters": "LoRA on raw parameters (target_parameters)",
    }
    for flag, what in unsupported.items():
        if config.get(flag):
            raise RanapassError(f"cannot compress this adapter: {what} ({flag}={config[flag]!r}) is not supported")


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the first key matching a dotted suffix of ``name``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _jsonable(value: Any) -> Any:
    """A PEFT config value as JSON would hold it (sets become sorted lists, enums their values)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def _natural_key(name: str) -> list[int | str]:
    """Sort key putting ``layers.2`` before ``layers.10`` (a file's keys are sorted as text)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
