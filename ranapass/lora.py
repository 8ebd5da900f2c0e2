"""Post-hoc rank compression of a trained LoRA adapter, with ranks allocated across the whole network.

Every adapted module holds an update ``ΔW = s · B A`` (A ``[r, n]``, B ``[m, r]``, ``s`` = lora_alpha / r,
or lora_alpha / sqrt(r) with rsLoRA). Its spectrum comes from the factors alone, never from ΔW::

    B = Q_B R_B,   Aᵀ = Q_A R_A,   s · R_B R_Aᵀ = U S Vᵀ  (an r×r SVD)   =>   ΔW = (Q_B U) S (Q_A V)ᵀ

Keeping the k largest singular values gives ``B' = Q_B U_k √S_k`` and ``A' = √S_k V_kᵀ Q_Aᵀ``: the scale is
folded into the factors and the written adapter sets lora_alpha = rank per module (PEFT scale 1), so keeping
every rank reproduces the adapter to rounding. Ranks are chosen per module by one of three methods:

- ``"global"``: ranapass's allocator (:func:`ranapass.cost_model.allocate.allocate`), candidates ranks
  0..r with cost = parameters (or FLOPs) and error = discarded energy ``Σ_{i>k} s_i²`` = ``‖ΔW - ΔW_k‖²_F``.
  It minimises the total discarded energy under the budget, so it pays for each rank what it costs.
- ``"threshold"``: PARA (arXiv 2604.27796): pool the singular values of all modules and keep the largest
  until the budget is spent, one global threshold. It ignores that a rank of a wide module costs more.
- ``"uniform"``: the same fraction of every module's rank, rounded down (so it may keep less than the
  budget when keep x rank is not whole); the baseline.

All of that is data-free. With calibration text (:func:`calibrate_lora`) the error becomes what the
truncation does to the fine-tuned model, measured with ``C = E[x xᵀ] = L Lᵀ`` over each module's inputs:

- ``error="output"``: the SVD of ``ΔW L`` (the same QR trick, on ``A L``) gives the truncation minimising
  ``E‖(ΔW - ΔW_k) x‖²``; the global allocation minimises the sum over modules of that error relative to
  the base layer's own output energy ``E‖W x‖²``, a scale the loss does not see.
- ``error="fisher"``: the loss's own scale. To second order, with ``g = ∂loss/∂y`` the module's output
  gradient, truncating costs ``½ E[δyᵀ diag(g²) δy]`` for ``δy = (ΔW - ΔW_k) x``; with the Kronecker-factored
  approximation ``G = diag(E[g²])`` (independent of x) that is ``½ ‖G^½ (ΔW - ΔW_k) L‖²_F``, which the SVD of
  ``G^½ ΔW L`` minimises (QR of ``G^½ B`` and of ``(A L)ᵀ``). These errors are in nats of loss, so they add
  across modules: the global allocation minimises their plain sum, and half the discarded energy is a
  prediction of the loss change (:attr:`LoraCompression.predicted_loss_change`).

Modules left at rank 0 are dropped from the written adapter (its ``target_modules`` lists the kept ones).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import logging
import math
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ranapass.calibrate import collect
from ranapass.cost_model.allocate import Candidate, Choice, allocate

if TYPE_CHECKING:
    from peft import PeftModel

__all__ = [
    "LoraAdapter",
    "LoraCalibration",
    "LoraCompression",
    "LoraFactors",
    "LoraSpectrum",
    "ModuleRanks",
    "calibrate_lora",
    "compress_lora",
    "load_lora",
    "lora_spectrum",
]

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
METHODS = ("global", "threshold", "uniform")
TARGETS = ("params", "flops")
ERRORS = ("energy", "relative", "output", "fisher")
CALIBRATED_ERRORS = ("output", "fisher")
FISHER_RIDGE = 1e-6
"""Added to each module's mean squared output gradient, relative to its mean: keeps ``G^{-1/2}`` finite for
output channels the loss never moved (their errors then cost almost nothing, as they should)."""
# The key of an adapted module's A factor: <prefix>.lora_A.weight (Linear) or <prefix>.lora_embedding_A.
_A_KEY = re.compile(r"^(?P<prefix>.+)\.(?:(?P<linear>lora_A)\.weight|(?P<embedding>lora_embedding_A))$")
_PEFT_PREFIX = "base_model.model."

Method = Literal["global", "threshold", "uniform"]
Target = Literal["params", "flops"]
ErrorKind = Literal["energy", "relative", "output", "fisher"]


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
        """Write ``adapter_config.json`` and ``adapter_model.safetensors``, the folder PEFT loads."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, out / WEIGHTS_NAME, metadata={"format": "pt"})
        (out / CONFIG_NAME).write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")
        return out


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


def _check_config(config: dict[str, Any]) -> None:
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"not a LoRA adapter: peft_type is {config.get('peft_type')!r}")
    unsupported = {
        "use_dora": "DoRA rescales each column by a learned magnitude, so truncating B·A does not truncate the update",
        "lora_bias": "a LoRA bias on lora_B",
        "target_parameters": "LoRA on raw parameters (target_parameters)",
    }
    for flag, what in unsupported.items():
        if config.get(flag):
            raise ValueError(f"cannot compress this adapter: {what} ({flag}={config[flag]!r}) is not supported")


def _natural_key(name: str) -> list[int | str]:
    """Sort key putting ``layers.2`` before ``layers.10`` (a file's keys are sorted as text)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _from_state_dict(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> LoraAdapter:
    _check_config(config)
    if any(".lora_magnitude_vector" in k for k in tensors):
        raise ValueError("cannot compress this adapter: it holds DoRA magnitude vectors (lora_magnitude_vector)")
    alpha = config.get("lora_alpha", 8)  # PEFT's default
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
            raise ValueError(f"adapter tensor {key} has no matching {b_key}")
        B = tensors[b_key]
        if A.ndim != 2 or B.ndim != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(f"cannot compress {prefix}: expected A [r, n] and B [m, r], got "
                             f"{tuple(A.shape)} and {tuple(B.shape)} (convolution LoRA is not supported)")
        name = prefix.removeprefix(_PEFT_PREFIX)
        r = A.shape[0]
        a = _pattern_value(alpha_pattern, name, alpha)
        modules.append(LoraFactors(name, prefix, embedding, A, B, a / math.sqrt(r) if rslora else a / r))
        used.update((key, b_key))
    if not modules:
        raise ValueError("the adapter holds no LoRA factors (no '*.lora_A.weight' or '*.lora_embedding_A' tensor)")
    modules.sort(key=lambda f: _natural_key(f.name))
    extra = {k: v for k, v in tensors.items() if k not in used}
    return LoraAdapter(dict(config), modules, extra)


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
        folder = Path(source)
        if not (folder / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{folder} is not a PEFT adapter folder: {CONFIG_NAME} is missing")
        if not (folder / WEIGHTS_NAME).is_file():
            hint = " (only safetensors is read: re-save it with save_pretrained(safe_serialization=True))" \
                if (folder / "adapter_model.bin").is_file() else ""
            raise FileNotFoundError(f"{folder / WEIGHTS_NAME} is missing{hint}")
        config = json.loads((folder / CONFIG_NAME).read_text())
        return _from_state_dict(config, load_file(folder / WEIGHTS_NAME))
    if not hasattr(source, "peft_config"):
        raise TypeError(f"expected an adapter folder or a peft.PeftModel, got {type(source).__name__}")
    from peft import get_peft_model_state_dict

    if adapter_name not in source.peft_config:
        raise KeyError(f"the PeftModel has no adapter {adapter_name!r} (it has {sorted(source.peft_config)})")
    config = _jsonable(source.peft_config[adapter_name].to_dict())
    tensors = get_peft_model_state_dict(source, adapter_name=adapter_name)
    return _from_state_dict(config, {k: v.detach().clone() for k, v in tensors.items()})


@dataclasses.dataclass
class LoraSpectrum:
    """The SVD of one module's update, ``ΔW = left · diag(values) · rightᵀ`` (float64).

    Data-free, it is the SVD of ΔW. Calibrated (``whiten=L``), it is the SVD of ``ΔW L`` mapped back:
    ``right = L⁻ᵀ Q_A V`` is then not orthonormal, and ``values²`` are output energies per token. With
    output weights too (``weight=G``), it is the SVD of ``G^½ ΔW L`` and ``left = G^-½ Q_B U``.

    Args:
        left: ``[m, t]``, orthonormal columns when unweighted.
        values: ``[t]``, descending; t = min(r, m, n).
        right: ``[n, t]``.
    """

    left: torch.Tensor
    values: torch.Tensor
    right: torch.Tensor

    def energy(self, k: int) -> float:
        """Energy of the k largest singular values (``‖ΔW_k‖²_F``, or ``E‖ΔW_k x‖²`` calibrated)."""
        return float(self.values[:k].square().sum())

    def factors(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B' ``[m, k]``, A' ``[k, n]``) with ``B' A' = ΔW_k``, the singular values split evenly."""
        root = self.values[:k].sqrt()
        return self.left[:, :k] * root, (self.right[:, :k] * root).T


def lora_spectrum(factors: LoraFactors, whiten: torch.Tensor | None = None,
                  weight: torch.Tensor | None = None) -> LoraSpectrum:
    """The spectrum of ``scale · B A`` from a QR of each factor and an r×r SVD (ΔW is never formed).

    Args:
        factors: the module's LoRA factors.
        whiten: optional lower-triangular ``L`` ``[n, n]`` with ``L Lᵀ`` the input second moment: the
            spectrum is then that of ``ΔW L``, whose truncation minimises the expected output error.
        weight: optional positive weights ``G`` ``[m]`` of the output channels: the spectrum is then that of
            ``G^½ ΔW L`` (``G = diag(weight)``; ``G^½ ΔW`` without ``whiten``), whose truncation minimises the
            weighted error ``‖G^½ (ΔW - ΔW_k) L‖²_F``.
    """
    A, B = factors.A.detach().double(), factors.B.detach().double()
    if whiten is not None:
        A = A @ whiten
    if weight is not None:
        root = weight.double().sqrt()[:, None]
        B = root * B
    qb, rb = torch.linalg.qr(B)    # qb: [m, p], rb: [p, r]
    qa, ra = torch.linalg.qr(A.T)  # qa: [n, q], ra: [q, r]
    u, s, vh = torch.linalg.svd(factors.scale * rb @ ra.T, full_matrices=False)  # core: [p, q]
    left, right = qb @ u, qa @ vh.T
    if whiten is not None:
        right = torch.linalg.solve_triangular(whiten.T, right, upper=True)  # L⁻ᵀ right
    if weight is not None:
        left = left / root  # G^-½ left
    return LoraSpectrum(left, s, right)


@dataclasses.dataclass
class LoraCalibration:
    """Statistics of the adapted modules, measured on the fine-tuned model (see :func:`calibrate_lora`).

    Args:
        whiten: per module path, the Cholesky factor ``L`` of its input second moment ``E[x xᵀ] = L Lᵀ``
            (float64; modules reading the same input share one tensor).
        output_energy: per module path, ``E‖W x‖²`` of the base layer (the scale ``error="output"`` divides by).
        tokens: calibration tokens seen.
        grad_sq: per module path, ``E[g²]`` per output channel, g the gradient of the window's summed loss
            with respect to the module's output (float64 ``[m]``); empty unless measured (``gradient_data``).
    """

    whiten: dict[str, torch.Tensor]
    output_energy: dict[str, float]
    tokens: int
    grad_sq: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


@contextlib.contextmanager
def _adapter_applied(adapter: LoraAdapter, linears: dict[str, torch.nn.Linear]) -> Iterator[None]:
    """Make each base linear compute its fine-tuned output ``W x + scale · B A x`` (a forward hook per module).

    Hooks registered later (the calibration's) see the fine-tuned output; inputs are unchanged.
    """
    def hook(f: LoraFactors, weight: torch.Tensor):
        A, B = (t.detach().to(weight.device, weight.dtype) for t in (f.A, f.B))

        def forward(module, args, out):
            return out + f.scale * torch.nn.functional.linear(torch.nn.functional.linear(args[0], A), B)
        return forward

    handles = [linears[f.name].register_forward_hook(hook(f, linears[f.name].weight)) for f in adapter.modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def calibrate_lora(adapter: LoraAdapter | str | os.PathLike | PeftModel, model: torch.nn.Module, data: Any, *,
                   batch_size: int = 4, gradient_data: Any = None) -> LoraCalibration:
    """Measure the adapter's modules on the fine-tuned model, for ``compress_lora(error="output" | "fisher")``.

    The model runs with ``adapter`` applied (each base linear adds its update), whatever ``model`` holds:
    the truncation errors to measure are those of the fine-tuned model, whose loss the compressed adapter
    must keep. Its inputs are the inputs the adapted layers see, and the second-order expansion of the loss
    behind ``error="fisher"`` is taken around the fine-tuned weights, where the adapter's training drove the
    mean gradient towards zero, so the first-order term drops out and ``E[g²]`` (the empirical Fisher)
    stands for the curvature. A PEFT LoRA layer's output is ``base(x) + lora(x)``: the gradient at the base
    linear's output (where the hooks sit) is the layer's own. On SmolLM2's rank-16 benchmark adapter
    (benchmarks/lora_compress.py, 32 windows) statistics of the fine-tuned model also did as well as or
    better than the base model's in all 8 variants measured (global/uniform x output/fisher x keep 0.25,
    0.125; paired over the evaluation windows: -0.00039 ± 0.00025 nats for global-fisher at 0.125, the
    others within ±0.0001).

    Args:
        adapter: the adapter (or its folder, or a ``PeftModel``) whose modules to measure.
        model: the base model the adapter was trained on (its adapted modules must be ``nn.Linear`` of the
            adapter's shapes), or a ``PeftModel`` on it (its own adapters are disabled; ``adapter`` is applied).
        data: calibration token windows ``[N, L]`` (e.g. :func:`ranapass.data.calibration_windows`), or an
            iterable of model inputs; at least as many tokens as the widest adapted input.
        batch_size: windows per forward.
        gradient_data: token windows for one backward pass each through the causal-LM loss, measuring the
            output gradients ``error="fisher"`` needs (e.g. ``data`` itself); None skips it.

    Example::

        model, tokenizer = ranapass.load_model()
        windows = ranapass.calibration_windows(tokenizer, num_windows=32)
        calibration = ranapass.calibrate_lora("my-adapter", model, windows, gradient_data=windows)
        result = ranapass.compress_lora("my-adapter", 0.25, error="fisher", calibration=calibration)
    """
    if not isinstance(adapter, LoraAdapter):
        adapter = load_lora(adapter)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    linears = {}
    for f in adapter.modules:
        try:
            module = base.get_submodule(f.name)
        except AttributeError as e:
            raise ValueError(f"the model has no module {f.name!r}: pass the base model the adapter was "
                             "trained on") from e
        module = getattr(module, "base_layer", module)  # a PEFT LoRA layer wraps the base linear
        if f.embedding or not isinstance(module, torch.nn.Linear):
            raise ValueError(f"{f.name!r} is a {type(module).__name__}: error='output' needs nn.Linear modules "
                             "(embedding LoRA is compressed data-free only)")
        if tuple(module.weight.shape) != f.shape:
            raise ValueError(f"{f.name!r} has weight {tuple(module.weight.shape)} but the adapter's update is "
                             f"{f.shape}: not the adapter's base model")
        linears[f.name] = module
    disabled = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with disabled, _adapter_applied(adapter, linears):
        stats = collect(base, data, linears=linears, batch_size=batch_size, sample_tokens=0, rank_min_aspect=0.0,
                        gradient_data=gradient_data)
    whiten, output_energy = {}, {}
    for site in stats.sites:
        gram = site.gram / site.tokens
        ridge = 1e-6 * float(gram.diagonal().mean()) + 1e-12  # keeps L invertible for inputs that never vary
        L = torch.linalg.cholesky(gram + ridge * torch.eye(len(gram), dtype=gram.dtype))
        for name in site.members:
            whiten[name] = L
            output_energy[name] = float((linears[name].weight.detach().double().cpu() @ L).square().sum())
    return LoraCalibration(whiten, output_energy, stats.tokens, stats.grad_sq)


def _tail_energy(values: torch.Tensor) -> list[float]:
    """``Σ_{i≥k} s_i²`` for k = 0..t (discarded energy when keeping k)."""
    tail = values.square().flip(0).cumsum(0).flip(0).tolist()
    return [*tail, 0.0]


def _allocate_global(spectra: Sequence[LoraSpectrum], costs: Sequence[int], budget: float,
                     norms: Sequence[float]) -> list[int]:
    """The allocator over ranks 0..t per module, error = discarded energy / the module's norm."""
    units = []
    for spec, c, norm in zip(spectra, costs, norms):
        tail = _tail_energy(spec.values)
        units.append(Choice.simple([Candidate(k * c, e / norm) for k, e in enumerate(tail)]))
    return [choice[0] for choice in allocate(units, budget).choice]


def _allocate_threshold(spectra: Sequence[LoraSpectrum], costs: Sequence[int], budget: float) -> list[int]:
    """PARA: the largest singular values of the whole network first, until the next one would not fit."""
    pooled = sorted(((float(v), i) for i, spec in enumerate(spectra) for v in spec.values), reverse=True)
    ranks, spent = [0] * len(spectra), 0.0
    for value, i in pooled:
        if value <= 0 or spent + costs[i] > budget:
            break
        ranks[i] += 1
        spent += costs[i]
    return ranks


def _allocate_uniform(modules: Sequence[LoraFactors], spectra: Sequence[LoraSpectrum], keep: float) -> list[int]:
    return [min(math.floor(keep * f.rank + 1e-9), len(s.values)) for f, s in zip(modules, spectra)]


@dataclasses.dataclass
class ModuleRanks:
    """One row of the compression table: a module's rank before and after, and the share of its update's
    energy kept (``‖ΔW‖²_F``, or ``E‖ΔW x‖²`` with a calibration)."""

    name: str
    shape: tuple[int, int]
    rank: int
    kept: int
    energy: float
    energy_kept: float

    @property
    def params_before(self) -> int:
        return self.rank * sum(self.shape)

    @property
    def params_after(self) -> int:
        return self.kept * sum(self.shape)


@dataclasses.dataclass
class LoraCompression:
    """The compressed adapter and what was kept of each module.

    Args:
        adapter: the compressed adapter (``adapter.save(dir)`` writes it).
        modules: per module, its rank before and after and the share of ΔW's energy kept.
        method, target, keep, error: the settings used.
        cost_before, cost_after: total cost in the target's unit (parameters, or FLOPs per token).
    """

    adapter: LoraAdapter
    modules: list[ModuleRanks]
    method: str
    target: str
    keep: float
    error: str
    cost_before: float
    cost_after: float

    @property
    def params_before(self) -> int:
        return sum(m.params_before for m in self.modules)

    @property
    def params_after(self) -> int:
        return sum(m.params_after for m in self.modules)

    @property
    def energy_kept(self) -> float:
        """Share of the adapter's total update energy kept (Σ ‖ΔW‖²_F, or Σ E‖ΔW x‖² calibrated)."""
        whole = sum(m.energy for m in self.modules)
        return sum(m.energy * m.energy_kept for m in self.modules) / whole if whole else 1.0

    @property
    def predicted_loss_change(self) -> float | None:
        """With ``error="fisher"``, the second-order prediction of the loss increase (nats per token): half the
        discarded loss-weighted energy, ``½ Σ ‖G^½ (ΔW - ΔW_k) L‖²_F``; None for other errors."""
        if self.error != "fisher":
            return None
        return 0.5 * sum(m.energy * (1 - m.energy_kept) for m in self.modules)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method, "target": self.target, "keep": self.keep, "error": self.error,
            "params_before": self.params_before, "params_after": self.params_after,
            "params_ratio": self.params_after / self.params_before if self.params_before else 1.0,
            "cost_before": self.cost_before, "cost_after": self.cost_after,
            "energy_kept": self.energy_kept, "predicted_loss_change": self.predicted_loss_change,
            "modules": [{"name": m.name, "shape": list(m.shape), "rank": m.rank, "kept": m.kept,
                         "energy_kept": m.energy_kept} for m in self.modules],
        }

    def summary(self) -> str:
        """A per-module table (module, shape, rank before, rank kept, energy kept) and the totals."""
        width = max([len("module"), *(len(m.name) for m in self.modules)])
        lines = [f"{'module':<{width}}  {'shape':>11}  {'rank':>4}  {'kept':>4}  {'energy kept':>11}"]
        for m in self.modules:
            shape = f"{m.shape[0]}x{m.shape[1]}"
            lines.append(f"{m.name:<{width}}  {shape:>11}  {m.rank:>4}  {m.kept:>4}  {m.energy_kept:>10.2%}")
        ratio = self.params_after / self.params_before if self.params_before else 1.0
        dropped = sum(m.kept == 0 for m in self.modules)
        lines += [
            "",
            f"method {self.method} (target {self.target}, keep {self.keep:g}, error {self.error})",
            f"LoRA parameters: {self.params_before:,} -> {self.params_after:,} ({ratio:.2%})",
        ]
        if self.target == "flops":
            lines.append(f"FLOPs per token: {self.cost_before:,.0f} -> {self.cost_after:,.0f} "
                         f"({self.cost_after / self.cost_before:.2%})")
        energy = {"output": "output energy (E|dW x|^2)",
                  "fisher": "loss-weighted output energy (|G^1/2 dW L|^2)"}.get(self.error, "update energy (|dW|_F^2)")
        lines.append(f"{energy} kept: {self.energy_kept:.2%}; modules dropped (rank 0): {dropped} of "
                     f"{len(self.modules)}")
        if self.predicted_loss_change is not None:
            lines.append(f"predicted loss change (second order): {self.predicted_loss_change:+.4f} nats per token")
        return "\n".join(lines)


def _compressed_config(config: dict[str, Any], kept: dict[str, int], dropped: bool) -> dict[str, Any]:
    """The input config with the new per-module ranks; alpha = rank per module, as the scale is folded in.

    Pattern keys are full module paths, PEFT's documented form: older PEFT looks them up as exact
    names, newer PEFT as regexes on a dotted suffix, which a full path matches for that module only.
    """
    out = dict(config)
    top = max(kept.values())
    out.update(r=top, lora_alpha=top, rank_pattern=dict(kept), alpha_pattern=dict(kept), use_rslora=False)
    if dropped:
        out["target_modules"] = sorted(kept)
    return out


def _check_calibration(calibration: LoraCalibration, modules: Sequence[LoraFactors], error: str) -> None:
    """Raise if ``calibration`` lacks a module of the adapter, or the gradients ``error="fisher"`` needs."""
    missing = [f.name for f in modules if f.name not in calibration.whiten]
    if missing:
        raise ValueError(f"the calibration does not cover {len(missing)} modules of the adapter, e.g. "
                         f"{missing[:3]}: calibrate this adapter with calibrate_lora")
    if error == "fisher":
        missing = [f.name for f in modules if f.name not in calibration.grad_sq]
        if missing:
            raise ValueError(f"error='fisher' needs output gradients, and the calibration has none for "
                             f"{len(missing)} modules, e.g. {missing[:3]}: pass gradient_data to calibrate_lora")


def _spectrum(factors: LoraFactors, calibration: LoraCalibration | None, error: str) -> LoraSpectrum:
    """The module's spectrum under ``error``: of ΔW (data-free), ΔW L (output) or G^½ ΔW L (fisher)."""
    if calibration is None:
        return lora_spectrum(factors)
    weight = None
    if error == "fisher":
        grad_sq = calibration.grad_sq[factors.name].double()
        weight = grad_sq + FISHER_RIDGE * float(grad_sq.mean()) + 1e-30
    return lora_spectrum(factors, calibration.whiten[factors.name], weight)


def compress_lora(
    adapter: LoraAdapter | str | os.PathLike | PeftModel,
    keep: float = 0.25,
    *,
    method: Method = "global",
    target: Target = "params",
    error: ErrorKind = "energy",
    calibration: LoraCalibration | None = None,
) -> LoraCompression:
    """Truncate each module of a LoRA adapter to the rank an allocation gives it, within ``keep`` of its cost.

    Args:
        adapter: a :class:`LoraAdapter`, an adapter folder or a ``PeftModel`` (read with :func:`load_lora`).
        keep: fraction of the adapter's cost to keep, in (0, 1].
        method: ``"global"`` (ranapass allocator), ``"threshold"`` (PARA's global threshold) or ``"uniform"``.
        target: cost counted by the budget: ``"params"`` (LoRA parameters) or ``"flops"`` (per token).
        error: what is measured and, by ``"global"``, minimised: ``"energy"`` (Σ discarded s², i.e.
            ‖ΔW - ΔW'‖²_F summed over modules), ``"relative"`` (each module's discarded share of its own
            energy), ``"output"`` (needs ``calibration``: the expected output error ``E‖(ΔW - ΔW')x‖²``,
            relative to the base layer's ``E‖W x‖²``; the truncation then minimises it too) or ``"fisher"``
            (needs a ``calibration`` with gradients: the second-order loss change ``½ ‖G^½ (ΔW - ΔW')L‖²_F``,
            in nats, summed over modules as it is; the truncation minimises it too).
        calibration: statistics from :func:`calibrate_lora`, for ``error="output"`` or ``"fisher"``.

    Returns:
        The compressed adapter and a per-module report; the input is not changed.

    Example::

        result = ranapass.compress_lora("my-adapter", keep=0.25)
        print(result.summary())
        result.adapter.save("my-adapter-25")   # PeftModel.from_pretrained(base, "my-adapter-25")
    """
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    for value, allowed, what in ((method, METHODS, "method"), (target, TARGETS, "target"), (error, ERRORS, "error")):
        if value not in allowed:
            raise ValueError(f"{what} must be one of {', '.join(allowed)}; got {value!r}")
    if (error in CALIBRATED_ERRORS) != (calibration is not None):
        raise ValueError(f"error='output' or 'fisher' needs a calibration (calibrate_lora), and a calibration is "
                         f"only used by those (got error={error!r})")
    if not isinstance(adapter, LoraAdapter):
        adapter = load_lora(adapter)

    modules = adapter.modules
    if calibration is not None:
        _check_calibration(calibration, modules, error)
    spectra = [_spectrum(f, calibration, error) for f in tqdm(modules, desc="LoRA spectra", unit="module",
                                                              disable=None)]
    costs = [f.cost_per_rank(target) for f in modules]
    cost_before = float(sum(f.rank * c for f, c in zip(modules, costs)))
    budget = keep * cost_before
    if method == "global":
        if error == "output":
            norms = [calibration.output_energy[f.name] for f in modules]
        elif error == "relative":
            norms = [spec.energy(len(spec.values)) or 1.0 for spec in spectra]
        else:  # energy; and fisher, whose errors are nats of loss already, additive across modules
            norms = [1.0] * len(modules)
        ranks = _allocate_global(spectra, costs, budget, norms)
    elif method == "threshold":
        ranks = _allocate_threshold(spectra, costs, budget)
    else:
        ranks = _allocate_uniform(modules, spectra, keep)
    if not any(ranks):
        top = max(f.rank for f in modules)
        why = (f"uniform keeps floor(keep x rank) ranks per module: keep must be at least 1/{top}"
               if method == "uniform" else f"the cheapest rank costs {min(costs)} {target} of {cost_before:,.0f}")
        raise ValueError(f"keep={keep} leaves no rank in any module: {why}; raise keep")

    new_modules, rows, kept = [], [], {}
    for f, spec, k in zip(modules, spectra, ranks):
        total = spec.energy(len(spec.values))
        rows.append(ModuleRanks(f.name, f.shape, f.rank, k, total, spec.energy(k) / total if total > 0 else 1.0))
        if k == 0:
            continue
        b, a = spec.factors(k)
        new_modules.append(dataclasses.replace(f, A=a.to(f.A.dtype), B=b.to(f.B.dtype), scale=1.0))
        kept[f.name] = k
    # A dropped module is no longer wrapped by PEFT: tensors saved under it (an embedding's base_layer) go too.
    dropped = tuple(f"{f.key}." for f, k in zip(modules, ranks) if k == 0)
    extra = {k: v for k, v in adapter.extra.items() if not k.startswith(dropped)} if dropped else dict(adapter.extra)
    if len(extra) < len(adapter.extra):
        log.warning("dropped %d tensors saved under modules left at rank 0: %s", len(adapter.extra) - len(extra),
                    sorted(set(adapter.extra) - set(extra)))
    config = _compressed_config(adapter.config, kept, dropped=bool(dropped))
    cost_after = float(sum(k * c for k, c in zip(ranks, costs)))
    log.info("LoRA %s: kept %d of %d modules, %.2f%% of %s", method, len(kept), len(modules),
             100 * cost_after / cost_before, target)
    return LoraCompression(LoraAdapter(config, new_modules, extra), rows, method, target, keep, error,
                           cost_before, cost_after)
