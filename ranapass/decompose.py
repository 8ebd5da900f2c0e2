"""Data-aware low-rank decomposition of a linear layer (RaNA's rank adapter basis), from calibration statistics.

With ``C = sum_x x x^T`` over calibration inputs, A holds the top eigenvectors of ``W C W^T``
(the principal axes of the layer's *outputs*, orthonormal) and ``B = A^T W``. Then ``B x`` are
the coordinates of the true output ``W x`` in that basis, ``A B`` projects onto W's column space,
and dropping rank i costs exactly ``(B x)_i^2`` of squared output error per token. This equals the
reference code's SVD of ``W X`` with ``pinv(X)`` whenever X has full row rank, without the pinv.
"""

from __future__ import annotations

import torch

__all__ = ["gram_factor", "output_pca", "weight_svd"]


@torch.no_grad()
def gram_factor(gram: torch.Tensor, tokens: int) -> torch.Tensor:
    """``L`` with ``L L^T = gram / tokens`` (float64), shared by every linear reading that input.

    The Cholesky factor where the second moment is positive definite (an order of magnitude faster than
    an eigendecomposition); a singular one (an input that never varies) falls back to ``V sqrt(diag(e))``
    of its eigendecomposition, negative rounding clamped to 0. Any ``L`` with ``L L^T = C`` serves
    ``output_pca``.
    """
    if tokens <= 0:
        raise ValueError("gram_factor needs at least one calibration token")
    c = gram.to(torch.float64) / tokens
    c = 0.5 * (c + c.t())
    factor, info = torch.linalg.cholesky_ex(c)
    if int(info) == 0:
        return factor
    evals, evecs = torch.linalg.eigh(c)
    return evecs * evals.clamp_min(0.0).sqrt()


@torch.no_grad()
def output_pca(weight: torch.Tensor, factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Output principal axes of ``y = W x`` for inputs with second moment ``factor factor^T``.

    ``W C W^T = (W L)(W L)^T``, so its eigenvectors are the left singular vectors of ``M = W L``,
    found from the eigenproblem of the smaller of ``M M^T`` and ``M^T M`` (q/k/v or gate/up stacks
    are tall: an ``[n, n]`` problem instead of ``[m, m]``).

    Args:
        weight: ``[m, n]``.
        factor: ``[n, n]`` from ``gram_factor``.

    Returns:
        ``A``: ``[m, r]`` float32 with orthonormal columns, ``r = min(m, n)``, by falling energy;
        ``energy``: ``[r]`` float64, the mean squared output along each axis (``E (B x)_i^2``).
    """
    mat = weight.detach().to(torch.float64) @ factor
    m, n = mat.shape
    if m <= n:
        energy, vecs = torch.linalg.eigh(mat @ mat.t())
        a = vecs.flip(1)
    else:
        energy, v = torch.linalg.eigh(mat.t() @ mat)
        v = v.flip(1)
        a = mat @ v / energy.flip(0).clamp_min(1e-300).sqrt()
        # Axes of (numerically) zero energy: any orthonormal completion will do.
        weak = energy.flip(0) <= energy.max() * 1e-12
        if weak.any():
            a, _ = torch.linalg.qr(a)
    energy = energy.flip(0).clamp_min(0.0)
    return a.to(torch.float32).contiguous(), energy


@torch.no_grad()
def weight_svd(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Data-free variant (``C = I``): left singular vectors of W and the squared singular values."""
    u, s, _ = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)
    return u.to(torch.float32).contiguous(), s.square()
