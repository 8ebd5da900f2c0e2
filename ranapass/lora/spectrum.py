"""The SVD of a LoRA update from its factors alone (ΔW is never formed), plain, whitened or loss-weighted.

    B = Q_B R_B,   Aᵀ = Q_A R_A,   s · R_B R_Aᵀ = U S Vᵀ  (an r×r SVD)   =>   ΔW = (Q_B U) S (Q_A V)ᵀ

Keeping the k largest singular values gives ``B' = Q_B U_k √S_k`` and ``A' = √S_k V_kᵀ Q_Aᵀ``: the scale is
folded into the factors, so keeping every rank reproduces the update to rounding. With the input second
moment ``C = E[x xᵀ] = L Lᵀ`` the same trick on ``A L`` gives the truncation minimising the output error
``E‖(ΔW - ΔW_k) x‖²``; with output-channel weights ``G`` too, on ``G^½ B``, the one minimising
``‖G^½ (ΔW - ΔW_k) L‖²_F`` (see :mod:`ranapass.lora.calibration` for what G and L measure).
"""

from __future__ import annotations

import dataclasses

import torch

from ranapass.lora.calibration import LoraCalibration
from ranapass.lora.io import LoraFactors

__all__ = ["FISHER_RIDGE", "LoraSpectrum", "lora_spectrum", "module_spectrum"]

FISHER_RIDGE = 1e-6
"""Added to each module's mean squared output gradient, relative to its mean: keeps ``G^{-1/2}`` finite for
output channels the loss never moved (their errors then cost almost nothing, as they should)."""


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

    @property
    def total_energy(self) -> float:
        """Energy of the whole update (``‖ΔW‖²_F``, or ``E‖ΔW x‖²`` calibrated)."""
        return self.energy(len(self.values))

    def energy(self, k: int) -> float:
        """Energy of the k largest singular values (``‖ΔW_k‖²_F``, or ``E‖ΔW_k x‖²`` calibrated)."""
        return float(self.values[:k].square().sum())

    def tail_energy(self) -> list[float]:
        """``Σ_{i≥k} s_i²`` for k = 0..t: the energy discarded when keeping k."""
        tail = self.values.square().flip(0).cumsum(0).flip(0).tolist()
        return [*tail, 0.0]

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


def module_spectrum(factors: LoraFactors, calibration: LoraCalibration | None, error: str) -> LoraSpectrum:
    """The module's spectrum under ``error``: of ΔW (data-free), ΔW L (output) or G^½ ΔW L (fisher)."""
    if calibration is None:
        return lora_spectrum(factors)
    weight = None
    if error == "fisher":
        grad_sq = calibration.grad_sq[factors.name].double()
        weight = grad_sq + FISHER_RIDGE * float(grad_sq.mean()) + 1e-30
    return lora_spectrum(factors, calibration.whiten[factors.name], weight)
