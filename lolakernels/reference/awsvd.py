"""Exact activation-weighted SVD by a full SVD (the oracle of ``lolakernels.awsvd``), and the
weighted error every AWSVD result is judged by.

For ``W [d_out, d_in]`` and per-input-channel scales ``d [d_in]`` (d > 0), the rank-k factors
minimising ``‖(W − L R) · diag(d)‖_F`` come from the SVD ``W · diag(d) = U S Vᵀ``
(Eckart–Young on the scaled matrix): ``L = U_k S_k^{1/2}``, ``R = S_k^{-1/2} U_kᵀ W``
(``= S_k^{1/2} V_kᵀ diag(d)⁻¹``, written without dividing by d). The optimal error is
``(Σ_{i>k} S_i²)^{1/2}``.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scaled(weight: Tensor, act_scale: Tensor) -> tuple[Tensor, Tensor]:
    dtype = _compute_dtype(weight.dtype)
    weight = weight.to(dtype)
    return weight, weight * act_scale.to(dtype).unsqueeze(-2)


def awsvd_exact(weight: Tensor, act_scale: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Optimal rank-``rank`` factors of ``weight`` under the ``act_scale`` weighting, by full SVD.

    Shapes: ``weight [..., d_out, d_in]``, ``act_scale [d_in]`` or ``[..., d_in]`` (one per
    matrix of the batch) → ``L [..., d_out, k]``, ``R [..., k, d_in]``. fp32 math (fp64 for
    fp64 input); returned in that compute dtype. Directions with a zero singular value get zero
    rows/columns (they carry nothing of ``W``).
    """
    weight, scaled = _scaled(weight, act_scale)
    u, s, _ = torch.linalg.svd(scaled, full_matrices=False)
    u, s = u[..., :rank], s[..., :rank]
    nonzero = s > 0
    root = s.sqrt()
    inverse_root = torch.where(nonzero, 1 / torch.where(nonzero, root, 1), 0)
    left = u * root.unsqueeze(-2)
    right = inverse_root.unsqueeze(-1) * (u.mT @ weight)
    return left, right


def weighted_error(weight: Tensor, act_scale: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """``‖(W − L R) · diag(d)‖_F`` per matrix (shape ``[...]``), in fp64."""
    weight = weight.double()
    residual = (weight - left.double() @ right.double()) * act_scale.double().unsqueeze(-2)
    return torch.linalg.matrix_norm(residual)


def optimal_weighted_error(weight: Tensor, act_scale: Tensor, rank: int) -> Tensor:
    """The smallest ``‖(W − L R) · diag(d)‖_F`` over rank-``rank`` factors: the norm of the
    singular values of ``W · diag(d)`` past the rank (shape ``[...]``), from an fp64 SVD."""
    singular_values = torch.linalg.svdvals(weight.double() * act_scale.double().unsqueeze(-2))
    return singular_values[..., rank:].norm(dim=-1)
