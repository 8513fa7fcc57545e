"""Truncated SVD by randomized range finding, and the activation-weighted SVD (AWSVD) built on it.

``randomized_svd`` is the shared primitive (also used by SVD merges and SVD-based inits);
``awsvd`` factorizes a weight so that the error on the activations it sees is smallest.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._backends import backend_available, forced_backend


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (float32, float16, bfloat16) computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _require_matrix(name: str, matrix: Tensor) -> None:
    if not isinstance(matrix, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [..., m, n], got {type(matrix).__name__}")
    if matrix.dim() < 2:
        raise ValueError(f"{name} must be a matrix [..., m, n] with at least 2 dims, got shape {list(matrix.shape)}")
    if not matrix.is_floating_point():
        raise TypeError(f"{name} has dtype {str(matrix.dtype).replace('torch.', '')}; expected a real floating "
                        "dtype (float32, float64, float16, bfloat16)")
    if matrix.shape[-1] == 0 or matrix.shape[-2] == 0:
        raise ValueError(f"{name} must have non-empty matrix dims, got shape {list(matrix.shape)}")


def _require_int(name: str, value, low: int, high: Optional[int], meaning: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int {meaning}, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        upper = "" if high is None else f"..{high}"
        raise ValueError(f"{name} = {value} is outside {low}{upper if upper else '..'} ({meaning})")
    return value


def _generator(device: torch.device, seed: int) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def default_oversample(rank: int) -> int:
    """Extra sketch columns beyond the rank: 10 for small ranks, half the rank beyond 20 (a wider
    sketch widens the spectral gap the power iterations work against: on flat spectra it saves
    more iterations than it costs)."""
    return max(10, rank // 2)


def default_niter(rank: int, min_dim: int) -> int:
    """Power iterations: more when the rank is a small fraction of the dimension, where the
    spectrum's gap at the rank is usually smallest relative to the tail's weight."""
    return 6 if rank < 0.1 * min_dim else 4


def orthonormal_basis(sketch: Tensor) -> Tensor:
    """Orthonormal basis ``Q [..., m, l]`` of the columns of ``sketch [..., m, l]`` (reduced QR)."""
    return torch.linalg.qr(sketch).Q


def randomized_svd(matrix: Tensor, rank: int, *, oversample: Optional[int] = None,
                   niter: Optional[int] = None, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``rank`` truncated SVD of a (batched) matrix by a randomized range finder.

    Math (Halko, Martinsson & Tropp 2011): with ``l = rank + oversample`` columns,
    ``Ω ~ N(0, 1)^{n×l}``, ``Q = orth(A Ω)``; each of ``niter`` power iterations replaces
    ``Q ← orth(A · orth(Aᵀ Q))`` (re-orthonormalised both ways, so the singular values raised to
    the power ``2·niter+1`` never overflow or collapse in floating point). Then ``B = Qᵀ A``
    (``l × n``), ``B = Û S Vh`` (a small exact SVD) and ``U = Q Û``. The error
    ``‖A − U_k S_k Vh_k‖`` approaches the optimal ``(Σ_{i>k} σ_i²)^{1/2}`` as the sketch
    captures the top singular subspace; the power iterations sharpen the spectrum by
    ``(σ_{l+1}/σ_k)^{2·niter}``.

    Args:
        matrix: ``A [..., m, n]`` (leading dims are a batch, each matrix factorized on its own).
        rank: ``k``, in ``1..min(m, n)``.
        oversample: extra sketch columns (default ``max(10, k // 2)``); the sketch is capped at
            ``min(m, n)`` columns, where the result is exact.
        niter: power iterations (default 6 when ``k < min(m, n) / 10`` else 4).
        seed: seeds a local ``torch.Generator`` on the matrix's device: the same seed gives the
            same result, and the global RNG is untouched.

    Returns:
        ``(U [..., m, k], S [..., k], Vh [..., k, n])``, singular values descending. Computed and
        returned in float64 for float64 input, else in float32 (float16/bfloat16 are upcast).
    """
    _require_matrix("matrix", matrix)
    m, n = matrix.shape[-2], matrix.shape[-1]
    min_dim = min(m, n)
    rank = _require_int("rank", rank, 1, min_dim, f"the target rank, 1..min(m, n) = {min_dim}")
    oversample = default_oversample(rank) if oversample is None else _require_int(
        "oversample", oversample, 0, None, "extra sketch columns, >= 0")
    niter = default_niter(rank, min_dim) if niter is None else _require_int(
        "niter", niter, 0, None, "power iterations, >= 0")
    seed = _require_int("seed", seed, 0, None, "the random seed, >= 0")

    a = matrix.to(_compute_dtype(matrix.dtype))
    width = min(rank + oversample, min_dim)
    generator = _generator(a.device, seed)
    test = torch.randn(*a.shape[:-2], n, width, generator=generator, device=a.device, dtype=a.dtype)
    a_t = a.mT
    q = orthonormal_basis(a @ test)
    for _ in range(niter):
        q = orthonormal_basis(a @ orthonormal_basis(a_t @ q))
    u_small, s, vh = torch.linalg.svd(q.mT @ a, full_matrices=False)
    return q @ u_small[..., :rank], s[..., :rank], vh[..., :rank, :]


# ----------------------------------------------------------------------------------------------
# AWSVD
# ----------------------------------------------------------------------------------------------

METHODS = ("auto", "randomized", "gram", "exact")

# Below this many rows/columns a full SVD costs little (tens of ms) and is exact.
EXACT_MAX_DIM = 256
# The randomized route serves ranks up to a fraction of min(d_out, d_in); above it the Gram +
# eigh route is cheaper. Measured on the CPU: eigh's cost relative to a GEMM grows with the size
# (≈ 5 GEMMs of the same size at 1024, ≈ 12 at 4096), so large matrices move the crossover up.
RANDOMIZED_MAX_RANK_FRACTION = 0.125
LARGE_DIM = 2048
RANDOMIZED_MAX_RANK_FRACTION_LARGE = 0.4


def choose_method(d_out: int, d_in: int, rank: int) -> str:
    """The method ``method="auto"`` runs for one shape and rank.

    ``"exact"`` for ``min(d_out, d_in) ≤ 256`` (a full SVD costs little there), ``"randomized"``
    while ``rank ≤ min(d_out, d_in) / 8``, or ``≤ 0.4 · min(d_out, d_in)`` from 2048 up (its
    adaptive power iterations stop within 1.01× of the optimum, and its sketch is narrow enough
    to cost less than an eigh of the Gram matrix), else ``"gram"``.
    """
    min_dim = min(d_out, d_in)
    if min_dim <= EXACT_MAX_DIM:
        return "exact"
    fraction = RANDOMIZED_MAX_RANK_FRACTION_LARGE if min_dim >= LARGE_DIM else RANDOMIZED_MAX_RANK_FRACTION
    if rank <= fraction * min_dim:
        return "randomized"
    return "gram"


# Relative size of the smallest Cholesky pivot below which CholeskyQR hands over to Householder
# QR: ~100 float32 roundings, i.e. sketches with condition numbers beyond ~10⁵.
_RANK_DEFICIENT = 100 * torch.finfo(torch.float32).eps


# A symmetric product is formed block row by block row, multiplying only the blocks on and below
# the diagonal (10 of 16): its consumers (Cholesky, eigh) read the lower triangle alone.
SYMMETRIC_PRODUCT_BLOCKS = 4
SYMMETRIC_PRODUCT_MIN_WIDTH = 512


def lower_gram(tall: Tensor) -> Tensor:
    """``[..., l, l]`` whose lower triangle is ``Xᵀ X``'s, for ``tall [..., m, l]``. Above the
    diagonal only the diagonal blocks are filled and the rest is zero (below 512 columns, where
    blocking saves nothing, it is the full product).

    Only for consumers that read the lower triangle (``torch.linalg.cholesky_ex`` with
    ``upper=False``, ``eigh``/``eigvalsh`` with ``UPLO="L"``); saves ~3/8 of the product.
    """
    width = tall.shape[-1]
    if width < SYMMETRIC_PRODUCT_MIN_WIDTH:
        return tall.mT @ tall
    gram = tall.new_zeros(*tall.shape[:-2], width, width)
    step = -(-width // SYMMETRIC_PRODUCT_BLOCKS)
    for start in range(0, width, step):
        stop = min(start + step, width)
        gram[..., start:stop, :stop] = tall[..., :, start:stop].mT @ tall[..., :, :stop]
    return gram


def gram64(tall: Tensor) -> Tensor:
    """Lower triangle of ``Xᵀ X`` (``lower_gram``) of ``tall [..., m, l]`` in float64 (so the
    Gram keeps singular values of X that are 10⁶ apart, which float32's squaring would not)."""
    return lower_gram(tall.double())


def cholesky_qr(tall: Tensor, gram: Optional[Tensor] = None, passes: int = 1) -> Tensor:
    """Orthonormal basis of the columns of ``tall [..., m, l]`` (m ≥ l) by CholeskyQR.

    ``G = Xᵀ X = Rᵀ R`` (Cholesky), ``Q = X R⁻¹``: GEMM-shaped work plus an ``l × l``
    factorization, instead of a Householder QR that runs far below GEMM speed on CPUs and GPUs.
    ``G`` is float64 and only its lower triangle is read (``gram`` may pass in ``gram64(X)`` when
    already computed); ``passes=2``
    (CholeskyQR2) restores orthogonality to working precision. A rank-deficient ``X`` (zero or
    exactly low-rank input) has no Cholesky factor and falls back to Householder QR.
    """
    basis = tall
    for index in range(passes):
        if index > 0 or gram is None:
            gram = gram64(basis)
        lower_factor, info = torch.linalg.cholesky_ex(gram)                      # G = L Lᵀ, R = Lᵀ
        pivots = lower_factor.diagonal(dim1=-2, dim2=-1).abs()
        # A pivot at rounding level means X is (numerically) rank-deficient: R⁻¹ would blow
        # rounding noise up into non-orthogonal columns.
        if bool(info.any()) or bool((pivots.amin(-1) <= _RANK_DEFICIENT * pivots.amax(-1)).any()):
            return orthonormal_basis(tall)
        basis = torch.linalg.solve_triangular(lower_factor.mT.to(basis.dtype), basis, upper=True, left=False)
    if not bool(torch.isfinite(basis).all()):
        return orthonormal_basis(tall)
    return basis


class TorchProducts:
    """The two products over the full weight that the randomized route needs. ``diag(d)`` is
    applied to the thin operand, so ``W · diag(d)`` is never formed."""

    @staticmethod
    def scaled_times(weight: Tensor, scale: Tensor, thin: Tensor) -> Tensor:
        """``W · diag(d) · X``: ``[..., m, n], [..., n], [..., n, l] → [..., m, l]``."""
        return weight @ (scale.unsqueeze(-1) * thin)

    @staticmethod
    def transpose_times(weight: Tensor, thin: Tensor) -> Tensor:
        """``Wᵀ · Q``: ``[..., m, n], [..., m, l] → [..., n, l]``."""
        return weight.mT @ thin


def _top_eigenpairs(gram: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Largest ``rank`` eigenvalues (descending, clamped at 0) and their eigenvectors."""
    values, vectors = torch.linalg.eigh(gram)
    values = values[..., -rank:].flip(-1).clamp_min(0)
    vectors = vectors[..., -rank:].flip(-1)
    return values, vectors


def _balanced_factors(left_vectors: Tensor, singular_values: Tensor, weight: Tensor,
                      projected: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """``L = U_k S^{1/2}``, ``R = S^{-1/2} U_kᵀ W`` (``projected`` = ``U_kᵀ W`` when known).

    A zero singular value gets a zero column of L and row of R: that direction carries nothing
    of ``W · diag(d)``.
    """
    if projected is None:
        projected = left_vectors.mT @ weight
    root = singular_values.sqrt()
    nonzero = root > 0
    inverse_root = torch.where(nonzero, 1 / torch.where(nonzero, root, 1), 0)
    return left_vectors * root.unsqueeze(-2), inverse_root.unsqueeze(-1) * projected


def _awsvd_exact(weight: Tensor, scale: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    u, s, _ = torch.linalg.svd(weight * scale.unsqueeze(-2), full_matrices=False)
    return _balanced_factors(u[..., :rank], s[..., :rank], weight)


# Extra eigenvectors the Gram route carries into its refinement step.
GRAM_OVERSAMPLE_FRACTION = 8
# The float32 Gram's rounding is about eps·λ_1 (λ = σ²: the Gram squares A's condition number).
# While that is below this fraction of the smallest retained eigenvalue λ_k, the eigenvectors are
# used as they come: measured on 2048² matrices with σ_i = i^-α (α ≤ 1) and Gaussian ones, the
# squared error then stays within 1e-6 of the optimum (from 1e-5 at λ_k/λ_1 = 5e-5 it grows to
# 4e-3 at 2e-6, where the refinement is needed).
GRAM_TRUSTED_ROUNDING = 1e-3


def _gram_eigenvectors_trusted(values: Tensor, rank: int) -> bool:
    """Whether ``eps · λ_1 ≤ GRAM_TRUSTED_ROUNDING · λ_k`` (and ``λ_k > 0``) for every matrix of
    the batch, ``values [..., l]`` descending."""
    smallest, largest = values[..., rank - 1], values[..., 0]
    rounding = torch.finfo(values.dtype).eps * largest
    return bool(((smallest > 0) & (rounding <= GRAM_TRUSTED_ROUNDING * smallest)).all())


def _awsvd_gram(weight: Tensor, scale: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    scaled = weight * scale.unsqueeze(-2)
    d_out, d_in = weight.shape[-2:]
    width = min(rank + max(10, rank // GRAM_OVERSAMPLE_FRACTION), d_out, d_in)
    # Eigenvectors of A Aᵀ are A's left singular vectors; when d_out > d_in the smaller Gram is
    # Aᵀ A, whose eigenvectors V give span(U) = span(A V).
    left_side = d_out <= d_in
    values, vectors = _top_eigenpairs(lower_gram(scaled.mT if left_side else scaled), width)
    if _gram_eigenvectors_trusted(values, rank):
        singular_values = values[..., :rank].sqrt()
        vectors = vectors[..., :rank]
        left_vectors = vectors if left_side else (scaled @ vectors) / singular_values.unsqueeze(-2)
        return _balanced_factors(left_vectors, singular_values, weight)
    # The smaller retained eigenvalues sit near the Gram's rounding, so their eigenvectors come
    # out perturbed (errors up to ~1% over the optimum on steep spectra). One power iteration on
    # A itself and a float64 Rayleigh–Ritz step recover them.
    basis = vectors if left_side else cholesky_qr(scaled @ vectors)
    return _subspace_iteration(weight, scale, basis, rank, 1, DEFAULT_TOLERANCE, TorchProducts)


def _converged(residuals: list[Tensor], tolerance: float) -> bool:
    """Whether the rank-k residual ``‖A‖² − Σ_{i≤k} σ_i(QᵀA)²`` has (nearly) stopped falling.

    Subspace iteration shrinks the excess over the optimum roughly geometrically, so with the
    last two drops ``δ_{q-1}, δ_q`` the excess still to come is about ``δ_q r / (1 − r)``,
    ``r = δ_q / δ_{q-1}`` (capped at 0.9). Stop when that is below ``tolerance`` × the residual,
    for every matrix of the batch.
    """
    if len(residuals) < 3:
        return False
    drop = (residuals[-2] - residuals[-1]).clamp_min(0)
    previous_drop = (residuals[-3] - residuals[-2]).clamp_min(0)
    ratio = torch.where(previous_drop > 0, drop / previous_drop.clamp_min(torch.finfo(drop.dtype).tiny), 0.0)
    ratio = ratio.clamp(0, 0.9)
    still_to_come = drop * ratio / (1 - ratio)
    return bool((still_to_come <= tolerance * residuals[-1]).all())


# Adaptive power iterations stop when the estimated excess of the squared error over the
# optimum falls below ``tolerance`` × the squared error (error ratio ≈ 1 + tolerance / 2):
# 1e-2 keeps "auto" within 1.01× of the optimum; 1e-3 gives ≈ 1.001×. Capped for spectra so
# flat that further iterations gain nothing measurable.
DEFAULT_TOLERANCE = 1e-2
ADAPTIVE_MAX_NITER = 12


def _awsvd_randomized(weight: Tensor, scale: Tensor, rank: int, oversample: int, niter: Optional[int],
                      tolerance: float, seed: int, products) -> tuple[Tensor, Tensor]:
    """Randomized AWSVD: a Gaussian sketch of A's range, then ``_subspace_iteration``."""
    d_out, d_in = weight.shape[-2:]
    width = min(rank + oversample, d_out, d_in)
    generator = _generator(weight.device, seed)
    test = torch.randn(*weight.shape[:-2], d_in, width, generator=generator, device=weight.device,
                       dtype=scale.dtype)
    basis = cholesky_qr(products.scaled_times(weight, scale, test))
    return _subspace_iteration(weight, scale, basis, rank, niter, tolerance, products)


def _subspace_iteration(weight: Tensor, scale: Tensor, basis: Tensor, rank: int, niter: Optional[int],
                        tolerance: float, products) -> tuple[Tensor, Tensor]:
    """Power iterations on ``A = W diag(d)`` from an orthonormal ``basis [..., d_out, l]`` of a
    guess of its range (``niter`` of them, or until ``_converged`` when ``niter`` is None),
    re-orthonormalised at every half step, then Rayleigh–Ritz for the rank-k factors."""
    dtype = scale.dtype
    if niter is None:
        total = (weight.to(dtype).square().sum(-2, dtype=torch.float64)
                 * scale.double().square()).sum(-1)                             # ‖A‖_F²
    residuals: list[Tensor] = []
    step = 0
    while True:
        transposed = products.transpose_times(weight, basis)            # Wᵀ Q   [d_in, l]
        co_sketch = transposed * scale.unsqueeze(-1)                    # Aᵀ Q = (Qᵀ A)ᵀ
        gram = gram64(co_sketch)                                        # (Qᵀ A)(Qᵀ A)ᵀ
        if niter is None:
            captured = torch.linalg.eigvalsh(gram)[..., -rank:].clamp_min(0).sum(-1)
            residuals.append((total - captured).clamp_min(0))
            if step == ADAPTIVE_MAX_NITER or _converged(residuals, tolerance):
                break
        elif step == niter:
            break
        co_basis = cholesky_qr(co_sketch, gram)
        basis = cholesky_qr(products.scaled_times(weight, scale, co_basis))
        step += 1
    # Rayleigh–Ritz: the top-k left singular vectors of the small Qᵀ A from its fp64 Gram.
    values, u_small = _top_eigenpairs(gram, rank)
    u_small = u_small.to(dtype)
    return _balanced_factors(basis @ u_small, values.sqrt().to(dtype), weight,
                             projected=u_small.mT @ transposed.mT)


def _uses_triton(weight: Tensor) -> bool:
    """Triton products for CUDA weights (or wherever ``LOLA_BACKEND=triton`` forces them)."""
    forced = forced_backend()
    if forced == "triton":
        available, reason = backend_available("triton")
        if not available:
            raise RuntimeError(f"LOLA_BACKEND=triton cannot run awsvd: {reason}")
        return True
    if forced is not None or weight.device.type != "cuda":
        return False
    return backend_available("triton")[0]


def _products_for(weight: Tensor):
    """(products, the weight operand they read): Triton reads W in its own dtype (fp32/fp16/bf16);
    torch's matmul needs it in the compute dtype."""
    if weight.dtype != torch.float64 and _uses_triton(weight):
        from ..triton.awsvd import TritonProducts

        return TritonProducts, weight
    return TorchProducts, weight.to(_compute_dtype(weight.dtype))


def _check_act_scale(act_scale, weight: Tensor) -> None:
    d_in = weight.shape[-1]
    if not isinstance(act_scale, Tensor):
        raise TypeError(f"act_scale must be a torch.Tensor [d_in] of positive per-input-channel scales, "
                        f"got {type(act_scale).__name__}")
    if not act_scale.is_floating_point():
        raise TypeError(f"act_scale has dtype {str(act_scale.dtype).replace('torch.', '')}; expected a floating dtype")
    batch = tuple(weight.shape[:-2])
    if tuple(act_scale.shape) not in ((d_in,), batch + (d_in,)):
        allowed = f"[{d_in}]" + (f" or [{', '.join(str(s) for s in batch + (d_in,))}]" if batch else "")
        raise ValueError(f"act_scale must have shape {allowed} (one scale per input channel of weight "
                         f"{list(weight.shape)}), got {list(act_scale.shape)}")
    if act_scale.device != weight.device:
        raise ValueError(f"act_scale is on {act_scale.device} but weight is on {weight.device}")
    finite = torch.isfinite(act_scale)
    if not bool(finite.all()) or not bool((act_scale > 0).all()):
        bad = (~finite | (act_scale <= 0)).nonzero()[0].tolist()
        raise ValueError(f"act_scale must be positive and finite; act_scale{bad} = {act_scale[tuple(bad)].item()}")


def awsvd(weight: Tensor, act_scale: Tensor, rank: int, *, method: str = "auto",
          oversample: Optional[int] = None, niter: Optional[int] = None,
          tolerance: float = DEFAULT_TOLERANCE, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Activation-weighted low-rank factors: ``L, R = argmin ‖(W − L R) · diag(d)‖_F``, rank k.

    ``d = act_scale`` weighs each input channel by how large its activations are (LoRAP/Wanda:
    ``d_j = sqrt(mean_t x_tj²)``), so the error is small where the layer's inputs are large.
    With ``A = W · diag(d) = U S Vᵀ`` the optimum is ``L = U_k S_k^{1/2}``,
    ``R = S_k^{-1/2} U_kᵀ W`` (``= S_k^{1/2} V_kᵀ diag(d)⁻¹``; no division by d) and the error is
    ``(Σ_{i>k} S_i²)^{1/2}``. Methods differ only in how ``U_k, S_k`` are found:

    - ``"exact"``: full SVD of A, ``O(m n min(m, n))`` with a large constant (the reference).
    - ``"gram"``: eigh of the smaller Gram matrix ``A Aᵀ`` or ``Aᵀ A`` (float32, lower
      triangle only) for the top singular directions. When the Gram's rounding ``eps · σ_1²``
      reaches 1e-3 of ``σ_k²`` (steep spectra), the top ``k + max(10, k/8)`` directions are
      refined by one power iteration on A and a float64 Rayleigh–Ritz step (the float32 Gram
      alone loses the smaller singular values); within ~1e-3 of the optimum, the fast route at
      high rank.
    - ``"randomized"``: range finder on A (``l = k + oversample`` Gaussian columns, ``niter``
      power iterations, CholeskyQR with a float64 Gram at each half step), then a Rayleigh–Ritz
      step: an ``l × l`` eigh of ``(Qᵀ A)(Qᵀ A)ᵀ``. ``diag(d)`` is applied to the thin
      operands (``W (d ∘ X)``, ``d ∘ (Wᵀ Q)``), never to a copy of W; on CUDA the products run in
      a Triton GEMM that folds d into its operand loads and reads W in its own dtype.
      ``O(m n l (2 niter + 2))``; the number of iterations adapts to the spectrum.
    - ``"auto"``: ``choose_method(d_out, d_in, rank)``: exact for min(d_out, d_in) ≤ 256,
      randomized for ``k ≤ min(d_out, d_in) / 8`` (``≤ 0.4 · min`` from 2048 up), else gram;
      the weighted error stays within 1.01× of the optimum.

    Args:
        weight: ``[d_out, d_in]`` or a batch ``[B, d_out, d_in]`` of same-shape matrices.
        act_scale: ``[d_in]`` (shared by the batch) or ``[B, d_in]``, positive and finite.
        rank: ``k`` in ``1..min(d_out, d_in)``.
        method: ``"auto"``, ``"randomized"``, ``"gram"`` or ``"exact"``.
        oversample: randomized route only: extra sketch columns (default ``max(10, k // 2)``).
        niter: randomized route only: a fixed number of power iterations. ``None`` (default)
            iterates until the rank-k residual ``‖A‖² − Σ_{i≤k} σ_i(QᵀA)²`` (read off the
            float64 Gram the orthonormalisation computes anyway) is predicted to be within
            ``tolerance`` of its limit, at least 2 and at most 12 iterations.
        tolerance: the adaptive stop: estimated excess of the squared error over the optimum,
            relative to it (1e-2 ≈ error within 1.005×; 1e-3 ≈ 1.0005×).
        seed: seeds the randomized route's local generator (the global RNG is untouched).

    Returns:
        ``(L [..., d_out, k], R [..., k, d_in])`` in ``weight``'s dtype; math in float32
        (float64 for float64 weights).
    """
    _require_matrix("weight", weight)
    if weight.dim() > 3:
        raise ValueError(f"weight must be [d_out, d_in] or [B, d_out, d_in], got shape {list(weight.shape)}")
    _check_act_scale(act_scale, weight)
    d_out, d_in = weight.shape[-2:]
    min_dim = min(d_out, d_in)
    rank = _require_int("rank", rank, 1, min_dim, f"the target rank, 1..min(d_out, d_in) = {min_dim}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if oversample is not None:
        _require_int("oversample", oversample, 0, None, "extra sketch columns, >= 0")
    if niter is not None:
        _require_int("niter", niter, 0, None, "power iterations, >= 0")
    _require_int("seed", seed, 0, None, "the random seed, >= 0")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 < tolerance < 1:
        raise ValueError(f"tolerance must be a number in (0, 1) (target excess of the squared error), "
                         f"got {tolerance!r}")
    if method == "auto":
        method = choose_method(d_out, d_in, rank)

    dtype = _compute_dtype(weight.dtype)
    scale = act_scale.to(dtype)
    if method == "randomized":
        products, operand = _products_for(weight)
        left, right = _awsvd_randomized(
            operand, scale, rank,
            default_oversample(rank) if oversample is None else oversample,
            niter, tolerance, seed, products)
    elif method == "gram":
        left, right = _awsvd_gram(weight.to(dtype), scale, rank)
    else:
        left, right = _awsvd_exact(weight.to(dtype), scale, rank)
    return left.to(weight.dtype), right.to(weight.dtype)
