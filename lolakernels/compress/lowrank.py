"""Exact low-rank algebra on factored matrices: never forms a d_out × d_in product.

Shared by joint compression (AdapterBank), the factor-based SVD merges and LoRA inits.
"""
from __future__ import annotations

from typing import Callable, Sequence

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


def thin_svd_of_products(lora_b: torch.Tensor, lora_a: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched thin SVD of ``M_i = lora_b[i] @ lora_a[i]`` from the factors.

    Shapes: ``lora_b [N, d_out, r]``, ``lora_a [N, r, d_in]``. Math: ``lora_b[i] = Q_b T_b`` and
    ``lora_a[i]ᵀ = Q_a T_a`` (reduced QR), the r × r core ``T_b T_aᵀ = U_c S Vh_c``, so
    ``M_i = (Q_b U_c) S (Q_a Vh_cᵀ)ᵀ``. Cost O(N·(d_out + d_in)·r²).

    Returns ``(left [N, d_out, p], sigma [N, p], right [N, d_in, p])`` with
    ``p = min(r, d_out, d_in)``: orthonormal columns, singular values descending, so
    ``M_i = left[i] @ diag(sigma[i]) @ right[i]ᵀ``. Computed in the inputs' dtype.
    """
    if lora_b.dim() != 3 or lora_a.dim() != 3:
        raise ValueError(f"lora_b must be [N, d_out, r] and lora_a [N, r, d_in], got shapes "
                         f"{list(lora_b.shape)} and {list(lora_a.shape)}")
    if lora_b.shape[0] != lora_a.shape[0] or lora_b.shape[2] != lora_a.shape[1]:
        raise ValueError(f"lora_b {list(lora_b.shape)} and lora_a {list(lora_a.shape)} do not chain as "
                         "[N, d_out, r] @ [N, r, d_in]")
    q_b, t_b = torch.linalg.qr(lora_b)
    q_a, t_a = torch.linalg.qr(lora_a.mT)
    u_core, sigma, vh_core = torch.linalg.svd(t_b @ t_a.mT, full_matrices=False)
    return q_b @ u_core, sigma, q_a @ vh_core.mT


def range_basis(apply: Callable[[torch.Tensor], torch.Tensor], apply_t: Callable[[torch.Tensor], torch.Tensor],
                rows: int, cols: int, rank: int, *, generator: torch.Generator, dtype: torch.dtype,
                device: torch.device, oversample: int = 10, power_iterations: int = 2) -> torch.Tensor:
    """Orthonormal ``[rows, rank]`` basis of the top-``rank`` left singular subspace of an operator
    ``Z [rows, cols]`` given only through ``apply(X) = Z @ X`` and ``apply_t(Y) = Zᵀ @ Y``.

    Randomized range finder (Halko, Martinsson & Tropp): ``Y = (Z Zᵀ)^q Z Ω`` with Gaussian
    ``Ω [cols, rank + oversample]`` (drawn from ``generator``, so the result is deterministic),
    re-orthonormalised between applications, then Rayleigh–Ritz: the top eigenvectors of the
    small Gram ``(Q_yᵀ Z)(Q_yᵀ Z)ᵀ`` pick the best ``rank`` directions inside the sketch. Costs
    ``2q + 2`` applications of ``Z`` or ``Zᵀ`` to ``rank + oversample`` vectors. When ``cols`` is
    no larger than the sketch, ``Z``'s own columns span its range and are used instead.

    If ``Z`` has rank below ``rank``, the basis is completed with seeded random orthonormal
    directions (Householder QR keeps the leading columns' span).
    """
    if not 0 < rank <= rows:
        raise ValueError(f"rank must be in [1, {rows}] (the operator's rows), got {rank}")
    sketch = min(rank + oversample, rows)
    if cols <= sketch:
        basis, _ = torch.linalg.qr(apply(torch.eye(cols, dtype=dtype, device=device)))
    else:
        omega = torch.randn(cols, sketch, generator=generator, dtype=dtype).to(device)
        basis, _ = torch.linalg.qr(apply(omega))
        for _ in range(power_iterations):
            back, _ = torch.linalg.qr(apply_t(basis))
            basis, _ = torch.linalg.qr(apply(back))
    small = apply_t(basis)
    _, vectors = torch.linalg.eigh((small.mT @ small).double())
    result = basis @ vectors.flip(-1)[:, :rank].to(dtype)
    if result.shape[1] < rank:
        filler = torch.randn(rows, rank - result.shape[1], generator=generator, dtype=dtype).to(device)
        result = torch.cat([result, filler], dim=1)
    # A last QR: Ritz vectors are orthonormal in exact arithmetic only.
    result, _ = torch.linalg.qr(result)
    return result


def squared_residuals(left: torch.Tensor, sigma: torch.Tensor, right: torch.Tensor, basis_left: torch.Tensor,
                      basis_right: torch.Tensor, cores: torch.Tensor, *, across_left: torch.Tensor | None = None,
                      across_right: torch.Tensor | None = None, chunk: int = 256) -> torch.Tensor:
    """``‖M_i − U K_i Vᵀ‖_F²`` for each i, without cancellation.

    Shapes: ``M_i = left[:, i] @ diag(sigma[i]) @ right[:, i]ᵀ`` with ``left [d_out, n, r]`` and
    ``right [d_in, n, r]`` holding orthonormal columns per adapter, ``sigma [n, r]``;
    ``U = basis_left [d_out, R]`` and ``V = basis_right [d_in, R]`` with orthonormal columns;
    ``cores [n, R, R]``. ``across_left [n, r, R]`` (``P_iᵀ U``) and ``across_right`` (``Q_iᵀ V``)
    may be passed when already known. Returns float64 ``[n]``.

    Math: ``M − U K Vᵀ = (I − UUᵀ)M + UUᵀM(I − VVᵀ) + U(UᵀMV − K)Vᵀ``, three mutually orthogonal
    terms, each formed explicitly from small or d × r pieces, so an almost exact fit gives an
    error near ε²‖M‖² instead of the ε‖M‖² a difference of squared norms would. Adapters are
    processed ``chunk`` at a time, bounding the d × r temporaries.
    """
    d_out, n, r = left.shape
    d_in, rank = right.shape[0], basis_left.shape[1]
    if across_left is None:
        across_left = (left.reshape(d_out, n * r).mT @ basis_left).reshape(n, r, rank)
    if across_right is None:
        across_right = (right.reshape(d_in, n * r).mT @ basis_right).reshape(n, r, rank)
    result = torch.empty(n, dtype=torch.float64, device=left.device)
    for start in range(0, n, chunk):
        part = slice(start, min(start + chunk, n))
        count = part.stop - start
        y, x, s = across_left[part], across_right[part], sigma[part]
        outside_left = left[:, part] - (basis_left @ y.reshape(-1, rank).mT).reshape(d_out, count, r)
        outside_right = right[:, part] - (basis_right @ x.reshape(-1, rank).mT).reshape(d_in, count, r)
        first = ((outside_left * s[None]) ** 2).sum(dim=(0, 2)).double()
        scaled_left = y * s[:, :, None]                                              # S_i P_iᵀU  [c, r, R]
        outside_gram = torch.einsum("dnj,dnk->njk", outside_right, outside_right)     # [c, r, r]
        second = torch.einsum("njk,njl,nlk->n", scaled_left, outside_gram, scaled_left).double()
        third = ((scaled_left.mT @ x - cores[part]) ** 2).sum(dim=(1, 2)).double()  # UᵀMV − K
        result[part] = first + second + third
    return result
