"""Exact low-rank algebra on factored matrices: never forms a d_out × d_in product.

Shared by joint compression (AdapterBank), the factor-based SVD merges and LoRA inits.
"""
from __future__ import annotations

from typing import Sequence

import torch


def product_sum_svd(lefts: Sequence[torch.Tensor], rights: Sequence[torch.Tensor],
                    rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``M = Σ_i lefts[i] @ rights[i]`` computed from the factors.

    Shapes: ``lefts[i] [d_out, r_i]``, ``rights[i] [r_i, d_in]``, with ``k = Σ r_i``.
    Math: ``[L_1 … L_n] = Q_l T_l`` and ``[R_1ᵀ … R_nᵀ] = Q_r T_r`` (reduced QR), so
    ``M = Q_l (T_l T_rᵀ) Q_rᵀ`` and the SVD of the k × k core gives ``M``'s: ``U = Q_l U_c``,
    ``Vh = Vh_c Q_rᵀ``. Cost O((d_out + d_in)·k²) instead of O(d_out·d_in·min(d_out, d_in)).

    Returns ``(U [d_out, p], S [p], Vh [p, d_in])`` with ``p = min(rank, k, d_out, d_in)``
    (all of them when ``rank`` is None), singular values in descending order. Computed in the
    inputs' dtype when it is float32/float64, else in float32.
    """
    if len(lefts) != len(rights) or not lefts:
        raise ValueError(f"lefts and rights must be non-empty and of equal length, got {len(lefts)} and {len(rights)}")
    dtype = lefts[0].dtype if lefts[0].dtype in (torch.float32, torch.float64) else torch.float32
    left = torch.cat([factor.to(dtype) for factor in lefts], dim=1)
    right = torch.cat([factor.to(dtype) for factor in rights], dim=0)
    if left.shape[1] != right.shape[0]:
        raise ValueError(f"inner ranks differ: lefts give {left.shape[1]} columns, rights {right.shape[0]} rows")
    q_left, t_left = torch.linalg.qr(left)
    q_right, t_right = torch.linalg.qr(right.T)
    u_core, s, vh_core = torch.linalg.svd(t_left @ t_right.T)
    keep = s.shape[0] if rank is None else min(rank, s.shape[0])
    return q_left @ u_core[:, :keep], s[:keep], vh_core[:keep] @ q_right.T
