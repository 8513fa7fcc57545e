"""Dense oracle for joint compression (docs/design.md §5), for small shapes and tests.

Everything here forms the deltas ``M_i = s_i B_i A_i`` ``[N, d_out, d_in]`` and works on them
directly (float64 recommended), written from the definitions rather than from the factored
algorithms in ``lolakernels.compress.joint``:

* objective and errors straight from ``‖M_i − U Σ_i Vᵀ‖_F²``;
* the JD-Full half-steps from the explicit Grams ``G_U = Σ_i w_i M_i V Vᵀ M_iᵀ`` (``d_out × d_out``):
  Rayleigh–Ritz on ``span[U, G_U U]``;
* exact HOOI (each half-step the top-R eigenvectors of the Gram) as the reference optimum;
* the JD-Diag least-squares steps by solving the vectorised problem with ``torch.linalg.lstsq``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def dense_deltas(lora_b: Tensor, lora_a: Tensor, scaling: Tensor) -> Tensor:
    """``M_i = scaling[i] · lora_b[i] @ lora_a[i]``: ``lora_b [N, d_out, r]``, ``lora_a [N, r, d_in]``,
    ``scaling [N]`` -> ``[N, d_out, d_in]``."""
    return scaling[:, None, None] * (lora_b @ lora_a)


def adapter_weights(deltas: Tensor, weighting: str) -> Tensor:
    """``w_i = 1/‖M_i‖²`` ("unit"; 0 for a zero delta) or 1 ("none")."""
    energy = (deltas ** 2).sum(dim=(1, 2))
    if weighting == "none":
        return torch.ones_like(energy)
    return torch.where(energy > 0, 1 / energy.clamp(min=1e-300), torch.zeros_like(energy))


def _as_matrices(cores: Tensor) -> Tensor:
    return torch.diag_embed(cores) if cores.dim() == 2 else cores


def reconstructions(basis_left: Tensor, cores: Tensor, basis_right: Tensor) -> Tensor:
    """``U Σ_i Vᵀ`` for each i; ``cores [N, R]`` (diagonal) or ``[N, R, R]``."""
    return basis_left @ _as_matrices(cores) @ basis_right.T


def weighted_loss(deltas: Tensor, weights: Tensor, basis_left: Tensor, cores: Tensor, basis_right: Tensor) -> Tensor:
    """``Σ_i w_i ‖M_i − U Σ_i Vᵀ‖_F²``."""
    residual = deltas - reconstructions(basis_left, cores, basis_right)
    return (weights * (residual ** 2).sum(dim=(1, 2))).sum()


def relative_errors(deltas: Tensor, basis_left: Tensor, cores: Tensor, basis_right: Tensor) -> Tensor:
    """``‖M_i − U Σ_i Vᵀ‖² / ‖M_i‖²`` per adapter (the residual itself where ``M_i = 0``)."""
    residual = ((deltas - reconstructions(basis_left, cores, basis_right)) ** 2).sum(dim=(1, 2))
    energy = (deltas ** 2).sum(dim=(1, 2))
    return torch.where(energy > 0, residual / energy.clamp(min=1e-300), residual)


def full_cores(deltas: Tensor, basis_left: Tensor, basis_right: Tensor) -> Tensor:
    """``Σ_i = Uᵀ M_i V`` (the optimal full core for orthonormal U, V)."""
    return basis_left.T @ deltas @ basis_right


def captured_energy(deltas: Tensor, weights: Tensor, basis_left: Tensor, basis_right: Tensor) -> Tensor:
    """JD-Full's objective ``f(U, V) = Σ_i w_i ‖Uᵀ M_i V‖_F²``."""
    return (weights * (full_cores(deltas, basis_left, basis_right) ** 2).sum(dim=(1, 2))).sum()


def left_gram(deltas: Tensor, weights: Tensor, basis_right: Tensor) -> Tensor:
    """``G_U = Σ_i w_i M_i V Vᵀ M_iᵀ`` ``[d_out, d_out]``."""
    projected = deltas @ basis_right
    return (weights[:, None, None] * projected @ projected.mT).sum(dim=0)


def right_gram(deltas: Tensor, weights: Tensor, basis_left: Tensor) -> Tensor:
    """``G_V = Σ_i w_i M_iᵀ U Uᵀ M_i`` ``[d_in, d_in]``."""
    projected = deltas.mT @ basis_left
    return (weights[:, None, None] * projected @ projected.mT).sum(dim=0)


def subspace_step(gram: Tensor, basis: Tensor) -> Tensor:
    """One subspace-iteration step: an orthonormal basis of ``range(G @ basis)``."""
    q, _ = torch.linalg.qr(gram @ basis)
    return q


def rayleigh_ritz_step(gram: Tensor, basis: Tensor, extra: Optional[Tensor] = None) -> Tensor:
    """The best R-dimensional subspace of ``span[B, G B, extra]`` for ``tr(Bᵀ G B)``: the top-R
    eigenvectors of ``Kᵀ G K`` for an orthonormal basis K of that span, mapped back through K."""
    blocks = [basis, gram @ basis] + ([extra] if extra is not None else [])
    krylov, _ = torch.linalg.qr(torch.cat(blocks, dim=1))
    _, vectors = torch.linalg.eigh(krylov.T @ gram @ krylov)
    return krylov @ vectors.flip(-1)[:, :basis.shape[1]]


def top_eigenvectors(gram: Tensor, rank: int) -> Tensor:
    _, vectors = torch.linalg.eigh(gram)
    return vectors.flip(-1)[:, :rank]


def hosvd(deltas: Tensor, weights: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Top-R eigenvectors of ``Σ w_i M_i M_iᵀ`` and ``Σ w_i M_iᵀ M_i``."""
    left = (weights[:, None, None] * deltas @ deltas.mT).sum(dim=0)
    right = (weights[:, None, None] * deltas.mT @ deltas).sum(dim=0)
    return top_eigenvectors(left, rank), top_eigenvectors(right, rank)


def jd_full_hooi(deltas: Tensor, weights: Tensor, rank: int, sweeps: int = 200,
                 start: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor]:
    """Exact alternating maximisation of ``f(U, V)``: U = top-R eigenvectors of ``G_U(V)``, then V
    = those of ``G_V(U)``, ``sweeps`` times, from HOSVD (or ``start``)."""
    basis_left, basis_right = start if start is not None else hosvd(deltas, weights, rank)
    for _ in range(sweeps):
        basis_left = top_eigenvectors(left_gram(deltas, weights, basis_right), rank)
        basis_right = top_eigenvectors(right_gram(deltas, weights, basis_left), rank)
    return basis_left, basis_right


def diag_cores(deltas: Tensor, basis_left: Tensor, basis_right: Tensor) -> Tensor:
    """Least-squares ``σ_i`` of ``‖M_i − Σ_k σ_ik u_k v_kᵀ‖``: ``lstsq`` on the design matrix whose
    columns are ``vec(u_k v_kᵀ)``."""
    design = torch.stack([torch.outer(basis_left[:, k], basis_right[:, k]).flatten()
                          for k in range(basis_left.shape[1])], dim=1)
    targets = deltas.flatten(1).T
    return torch.linalg.lstsq(design, targets, driver="gelsd").solution.T


def jd_diag_left_step(deltas: Tensor, weights: Tensor, basis_right: Tensor, sigmas: Tensor) -> Tensor:
    """Least-squares U of ``Σ_i w_i ‖M_i − U diag(σ_i) Vᵀ‖²`` for fixed V, σ: stacking the adapters
    side by side, ``[√w_i M_i]_i ≈ U [√w_i diag(σ_i) Vᵀ]_i``, solved with ``lstsq``."""
    root = weights.sqrt()[:, None, None]
    targets = torch.cat(list(root * deltas), dim=1)                                   # [d_out, N·d_in]
    design = torch.cat(list(root * (torch.diag_embed(sigmas) @ basis_right.T)), dim=1)  # [R, N·d_in]
    return torch.linalg.lstsq(design.T, targets.T, driver="gelsd").solution.T


def jd_diag_right_step(deltas: Tensor, weights: Tensor, basis_left: Tensor, sigmas: Tensor) -> Tensor:
    """Least-squares V for fixed U, σ (the transposed problem)."""
    return jd_diag_left_step(deltas.mT, weights, basis_left, sigmas)


def truncated_svd(deltas: Tensor, rank: int) -> Tensor:
    """Each delta's best rank-R approximation ``[N, d_out, d_in]`` (Eckart–Young)."""
    u, s, vh = torch.linalg.svd(deltas, full_matrices=False)
    return u[..., :rank] @ torch.diag_embed(s[..., :rank]) @ vh[..., :rank, :]
