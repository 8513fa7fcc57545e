"""PEFT's SVD adapter merges (``add_weighted_adapter`` with ``svd``, ``ties_svd``,
``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``) for one adapted weight.

For adapters i = 1..n with factors ``A_i [r_i, d_in]`` (``lora_A``), ``B_i [d_out, r_i]``
(``lora_B``), PEFT scalings ``s_i`` and merge weights ``w_i``, PEFT forms every delta
``Δ_i = s_i B_i A_i`` densely, combines them into ``M`` and takes a full SVD of ``M``
(O(d_out · d_in · min(d_out, d_in))) to keep its top ``k`` components. Here:

- ``svd``: ``M = Σ_i w_i s_i B_i A_i`` has rank ≤ ``K = Σ r_i``; its SVD comes exactly from the
  factors (QR of the stacked factors and an SVD of a K × K core, ``product_sum_svd``), never
  forming a d_out × d_in matrix: O((d_out + d_in) · K²).
- the pruning combinations act on single entries of the ``Δ_i``, so ``M`` is formed densely, one
  adapter at a time (``combine.combine_deltas``), and its top-k SVD is computed by a randomized
  range finder whose sketch spans ``max(k, K) + max(10, K)`` directions with 8 power
  iterations: a pruned sum of rank-r_i deltas is its rank-K signal plus a pruning residue spread
  over all directions, and a sketch covering the signal with as much margin again converges to
  PEFT's exact truncation even at DARE's low densities, where the residue (rescaled by
  1/density) is largest. Wide sketches (over half of ``min(d_out, d_in)``) run the exact SVD.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .._checks import require_dims, require_dtype
from ..compress.weighted_svd import randomized_svd
from ..compress.lowrank import product_sum_svd
from . import combine

COMBINATION_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
SVD_METHODS = ("auto", "randomized", "exact")
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# torch.quantile refuses inputs of more than 2**24 entries; larger ones interpolate by sorting.
_QUANTILE_LIMIT = 1 << 24


def _check_factors(lora_a: Sequence[Tensor], lora_b: Sequence[Tensor]) -> tuple[int, int, list[int]]:
    for name, factors in (("lora_a", lora_a), ("lora_b", lora_b)):
        if isinstance(factors, Tensor) or not isinstance(factors, Sequence):
            raise TypeError(f"{name} must be a list of 2-D tensors (one per adapter), got {type(factors).__name__}")
    if not lora_a:
        raise ValueError("lora_a must hold at least one adapter's lora_A [r_i, d_in]")
    if len(lora_b) != len(lora_a):
        raise ValueError(f"lora_b holds {len(lora_b)} adapters but lora_a holds {len(lora_a)}")
    d_in = d_out = None
    ranks = []
    for i, (a, b) in enumerate(zip(lora_a, lora_b)):
        require_dims(f"lora_a[{i}]", a, 2, "[r_i, d_in] (PEFT's lora_A weight)")
        require_dims(f"lora_b[{i}]", b, 2, "[d_out, r_i] (PEFT's lora_B weight)")
        require_dtype(f"lora_a[{i}]", a, FLOAT_DTYPES)
        require_dtype(f"lora_b[{i}]", b, FLOAT_DTYPES)
        if a.shape[0] != b.shape[1]:
            raise ValueError(f"lora_a[{i}] has rank {a.shape[0]} (shape {list(a.shape)}) but lora_b[{i}] has "
                             f"{b.shape[1]} (shape {list(b.shape)})")
        if a.device != lora_a[0].device or b.device != lora_a[0].device:
            raise ValueError(f"adapter {i} is on {a.device}/{b.device} but lora_a[0] is on {lora_a[0].device}: "
                             "all factors must share a device")
        d_in = a.shape[1] if d_in is None else d_in
        d_out = b.shape[0] if d_out is None else d_out
        if a.shape[1] != d_in:
            raise ValueError(f"lora_a[{i}].shape[1] = {a.shape[1]} but lora_a[0] has d_in = {d_in}")
        if b.shape[0] != d_out:
            raise ValueError(f"lora_b[{i}].shape[0] = {b.shape[0]} but lora_b[0] has d_out = {d_out}")
        ranks.append(a.shape[0])
    if d_in == 0 or d_out == 0:
        raise ValueError(f"the adapted weight must be non-empty, got d_out = {d_out}, d_in = {d_in}")
    return d_out, d_in, ranks


def _float_list(name: str, values, count: int, meaning: str) -> list[float]:
    if isinstance(values, Tensor):
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a sequence of {count} numbers ({meaning}), got {type(values).__name__}")
    if len(values) != count:
        raise ValueError(f"{name} has {len(values)} entries but there are {count} adapters ({meaning})")
    out = []
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name}[{i}] must be a number ({meaning}), got {type(value).__name__}")
        out.append(float(value))
    return out


def check_merge_options(combination_type: str, density: Optional[float], majority_sign_method: str,
                        clamp: Optional[float]) -> None:
    """Raises ValueError/TypeError for options PEFT would turn into a crash or a NaN adapter."""
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"combination_type = {combination_type!r}; expected one of {', '.join(COMBINATION_TYPES)}")
    if combination_type != "svd":
        if density is None:
            raise ValueError(f"density is required for combination_type {combination_type!r}: the fraction of each "
                             "delta's entries kept, in [0, 1]")
        if isinstance(density, bool) or not isinstance(density, (int, float)):
            raise TypeError(f"density must be a number in [0, 1], got {type(density).__name__}")
        if not 0 <= density <= 1:
            raise ValueError(f"density = {density} is outside [0, 1] (the fraction of entries kept)")
        if combination_type.startswith("dare") and density == 0:
            raise ValueError("density = 0 with DARE would divide the pruned deltas by zero; use a density in (0, 1]")
    if combination_type in ("ties_svd", "dare_ties_svd") and majority_sign_method not in combine.SIGN_METHODS:
        raise ValueError(f"majority_sign_method = {majority_sign_method!r}; expected 'total' or 'frequency'")
    if clamp is not None:
        if isinstance(clamp, bool) or not isinstance(clamp, (int, float)):
            raise TypeError(f"clamp must be None or a quantile in [0, 1], got {type(clamp).__name__}")
        if not 0 <= clamp <= 1:
            raise ValueError(f"clamp = {clamp} is outside [0, 1] (a quantile of the factors' entries)")


def quantile(values: Tensor, q: float) -> Tensor:
    """``torch.quantile(values, q)`` (linear interpolation), also beyond its 2**24-entry limit."""
    if values.numel() <= _QUANTILE_LIMIT:
        return torch.quantile(values, q)
    ordered = values.sort().values
    position = q * (ordered.numel() - 1)
    below = int(position)
    above = min(below + 1, ordered.numel() - 1)
    return ordered[below] + (position - below) * (ordered[above] - ordered[below])


def clamp_factors(lora_a: Tensor, lora_b: Tensor, clamp: float) -> tuple[Tensor, Tensor]:
    """PEFT's ``svd_clamp``: ``h = quantile([vec(B), vec(A)], clamp)``; both factors clipped to
    ``[−h, h]``. The quantile is of signed entries, so it depends on the singular vectors' signs,
    which any SVD leaves arbitrary."""
    high = quantile(torch.cat([lora_b.flatten(), lora_a.flatten()]), clamp)
    return lora_a.clamp(-high, high), lora_b.clamp(-high, high)


def canonical_signs(u: Tensor, vh: Tensor) -> tuple[Tensor, Tensor]:
    """Flips singular pairs so that each column of ``u`` has its largest-magnitude entry positive.

    Any SVD leaves each pair's sign free; fixing it makes the result independent of the
    algorithm, which the clamp (a quantile of signed entries) depends on."""
    largest = u.abs().argmax(dim=0, keepdim=True)
    signs = torch.sign(torch.gather(u, 0, largest))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return u * signs, vh * signs.mT


def _pad_rank(u: Tensor, vh: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Zero components up to ``rank`` where the merged delta has fewer non-trivial ones."""
    missing = rank - u.shape[1]
    if missing <= 0:
        return u, vh
    return (torch.cat([u, u.new_zeros(u.shape[0], missing)], dim=1),
            torch.cat([vh, vh.new_zeros(missing, vh.shape[1])], dim=0))


def truncated_svd(matrix: Tensor, rank: int, *, signal_rank: int = 0, method: str = "auto",
                  niter: Optional[int] = None, oversample: Optional[int] = None,
                  seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``rank`` SVD of a dense ``matrix [m, n]``: randomized (sketch of
    ``max(rank, signal_rank) + oversample`` columns, ``oversample = max(10, signal_rank)`` and
    ``niter = 8`` power iterations by default) or exact.

    ``"auto"`` runs the exact SVD when the sketch would span over half of ``min(m, n)``, where the
    randomized range finder stops being cheaper. Returns ``(U [m, rank], S [rank], Vh [rank, n])``.
    """
    if method not in SVD_METHODS:
        raise ValueError(f"svd_method = {method!r}; expected one of {', '.join(SVD_METHODS)}")
    min_dim = min(matrix.shape)
    extra = max(10, signal_rank) if oversample is None else oversample
    width = min(max(rank, signal_rank) + extra, min_dim)
    if method == "exact" or (method == "auto" and 2 * width > min_dim):
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    return randomized_svd(matrix, rank, oversample=width - rank, niter=8 if niter is None else niter, seed=seed)


def svd_merge(
    lora_a: Sequence[Tensor],
    lora_b: Sequence[Tensor],
    weights: Sequence[float],
    combination_type: str = "svd",
    *,
    scalings: Optional[Sequence[float]] = None,
    rank: Optional[int] = None,
    density: Optional[float] = None,
    majority_sign_method: str = "total",
    clamp: Optional[float] = None,
    transpose_delta: bool = False,
    svd_method: str = "auto",
    niter: Optional[int] = None,
    oversample: Optional[int] = None,
    seed: int = 0,
    generator: Optional[torch.Generator] = None,
) -> tuple[Tensor, Tensor]:
    """Merges n LoRA adapters of one weight into one rank-k adapter, as PEFT's
    ``add_weighted_adapter`` does for its SVD combination types.

    Math: ``Δ_i = s_i B_i A_i``; ``M = combine(Δ_1..Δ_n; w)`` (``svd``: ``Σ_i w_i Δ_i``; the others
    prune the Δ_i elementwise first, see :mod:`lolakernels.merge.combine`);
    ``M ≈ U_k S_k Vh_k`` (top k); the new adapter is ``lora_B = U_k S_k``, ``lora_A = Vh_k``
    (PEFT's split), so ``lora_B @ lora_A`` is M's best rank-k approximation. With ``clamp``
    both factors are clipped to ± the ``clamp`` quantile of their entries (PEFT's ``svd_clamp``).
    ``svd`` is computed exactly from the factors; the others form M and use a randomized SVD
    (see the module docstring).

    Args:
        lora_a: n tensors ``[r_i, d_in]`` (PEFT's ``lora_A`` weights; ``lora_embedding_A`` for
            embeddings).
        lora_b: n tensors ``[d_out, r_i]`` (``lora_B`` / ``lora_embedding_B``).
        weights: n merge weights ``w_i`` (negative ones subtract).
        combination_type: ``svd``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd`` or
            ``magnitude_prune_svd``.
        scalings: n PEFT scalings ``s_i`` (``lora_alpha / r``; default 1). They multiply the
            deltas before pruning, which TIES' sign election depends on.
        rank: k (default ``max r_i``, PEFT's default); at most ``min(d_out, d_in)`` components are
            returned, zero-padded when M has fewer non-zero singular values than k.
        density: fraction of each delta's entries kept, in [0, 1] (required except for ``svd``;
            > 0 for DARE, which rescales by 1/density).
        majority_sign_method: ``"total"`` or ``"frequency"`` (TIES sign election).
        clamp: None or a quantile in [0, 1].
        transpose_delta: form the deltas as ``(B_i A_i)ᵀ`` for the elementwise steps, as PEFT does
            for ``fan_in_fan_out`` layers and embeddings, so that DARE's random masks are drawn in
            the same layout; the result is the same orientation either way.
        svd_method: ``"auto"``, ``"randomized"`` or ``"exact"`` for the dense combinations.
        niter, oversample, seed: the randomized SVD's power iterations (default 8), extra sketch
            columns beyond ``max(k, Σ r_i)`` (default ``max(10, Σ r_i)``) and seed.
        generator: DARE's random masks come from it; by default from the global RNG, consumed as
            PEFT consumes it (one ``bernoulli`` per adapter, in order), so a merge run after the
            same ``torch.manual_seed`` draws the same masks as PEFT.

    Returns:
        ``(lora_a [p, d_in], lora_b [d_out, p])`` with ``p = min(k, d_out, d_in)``, in float32
        (float64 when the factors are float64), as PEFT returns them. Each component's sign is
        fixed (:func:`canonical_signs`), so results do not depend on the SVD algorithm.
    """
    d_out, d_in, ranks = _check_factors(lora_a, lora_b)
    n = len(ranks)
    weight_list = _float_list("weights", weights, n, "one merge weight per adapter")
    scaling_list = [1.0] * n if scalings is None else _float_list("scalings", scalings, n,
                                                                   "one PEFT scaling per adapter")
    check_merge_options(combination_type, density, majority_sign_method, clamp)
    if rank is None:
        rank = max(ranks)
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be a positive int (the merged adapter's rank), got {type(rank).__name__}")
    if rank < 1:
        raise ValueError(f"rank = {rank}; expected a positive int (the merged adapter's rank)")
    if svd_method not in SVD_METHODS:
        raise ValueError(f"svd_method = {svd_method!r}; expected one of {', '.join(SVD_METHODS)}")
    kept = min(rank, d_out, d_in)
    float64 = any(t.dtype == torch.float64 for t in list(lora_a) + list(lora_b))
    compute_dtype = torch.float64 if float64 else torch.float32
    device = lora_a[0].device
    merge_weights = torch.tensor(weight_list, dtype=compute_dtype, device=device)

    if combination_type == "svd":
        lefts = [b.to(compute_dtype) * (w * s) for b, w, s in zip(lora_b, merge_weights.tolist(), scaling_list)]
        u, s, vh = product_sum_svd(lefts, [a.to(compute_dtype) for a in lora_a], rank=kept)
    else:
        def delta(i: int) -> Tensor:
            return combine.adapter_delta(lora_a[i], lora_b[i], scaling_list[i], transpose_delta)

        merged = combine.combine_deltas(delta, merge_weights, combination_type[: -len("_svd")], density=density,
                                        majority_sign_method=majority_sign_method, generator=generator)
        if transpose_delta:
            merged = merged.T
        u, s, vh = truncated_svd(merged.to(compute_dtype), kept, signal_rank=sum(ranks), method=svd_method,
                                 niter=niter, oversample=oversample, seed=seed)
    u, vh = canonical_signs(u, vh)
    new_b, new_a = _pad_rank(u * s.to(u.dtype), vh, kept)
    if clamp is not None:
        new_a, new_b = clamp_factors(new_a, new_b, clamp)
    return new_a.contiguous(), new_b.contiguous()
