"""Joint compression of a LoRA collection into an AdapterBank (Compress then Serve).

Per slot, adapter i's delta is ``M_i = s_i B_i A_i`` (PEFT's scaling folded in), ``B_i [d_out, r_i]``,
``A_i [r_i, d_in]``. Every method works from the factors, never forming a ``d_out × d_in`` matrix per
adapter (except ``ties``, whose elementwise trimming needs the dense delta: it streams one adapter at
a time). First each adapter becomes a thin SVD ``M_i = P_i S_i Q_iᵀ`` (``P_i [d_out, r]``,
``Q_i [d_in, r]`` orthonormal; batched QR of the factors plus an r × r SVD), stored side by side as
``P = [P_1 … P_N] [d_out, N·r]`` and ``Q [d_in, N·r]`` so each step below is a single GEMM.

With weights ``w_i`` (``1/‖M_i‖²`` for ``weighting="unit"``, 1 for ``"none"``), each cluster fits

* ``jd-full``: ``min Σ_i w_i ‖M_i − U Σ_i Vᵀ‖²`` over orthonormal ``U [d_out, R]``, ``V [d_in, R]``
  and full ``Σ_i = Uᵀ M_i V``; equivalently ``max f(U, V) = Σ_i w_i ‖Uᵀ M_i V‖²``. Alternating
  (HOOI-like) sweeps. The exact half-update is the top-R eigenspace of ``G_U = Σ_i w_i M_i V Vᵀ M_iᵀ``
  (``d_out × d_out``, never formed); instead each half-step is Rayleigh–Ritz on
  ``span[U, G_U U, U_previous]`` (LOBPCG-style), with ``G_U`` applied through the factors,
  ``G_U B = Σ_i P_i S_i X_i X_iᵀ S_i P_iᵀ B``, ``X_i = Q_iᵀ V``; V likewise. U lies in the search
  space, so f never decreases (each step is also checked in floating point). Cost per sweep: ten
  GEMMs of ``(d_out or d_in) × N·r × R``.
  Start: the top-R left singular subspaces of ``[√w_i M_i]_i`` and ``[√w_i M_iᵀ]_i`` (HOSVD) by a
  seeded randomized range finder.
* ``jd-diag``: ``Σ_i = diag(σ_i)`` with free U, V (CP by alternating least squares):
  ``σ_i = G⁺ diag(Uᵀ M_i V)``, ``G = (UᵀU) ⊙ (VᵀV)``; ``U = (Σ_i w_i M_i V D_i) H⁺``,
  ``H = (VᵀV) ⊙ Σ_i w_i σ_i σ_iᵀ``; V likewise; columns rescaled to unit norm each sweep. Every step
  is an exact minimiser, so the loss never increases; each sweep also tries an extrapolation along
  its own step (kept only if it lowers the loss). Plain ALS from a random or HOSVD start needs
  hundreds of sweeps, so it starts from JD-Full's bases and an ALS fit of the small cores
  ``Uᵀ M_i V`` (:func:`jd_diag_start`).

Both stop when a sweep improves the weighted loss by at most ``tol · Σ_i w_i ‖M_i‖²``.

``clusters = k``: k-subspaces alternation (k-means++-style seeding from single adapters, fit a basis
per cluster, reassign each adapter to the basis that reconstructs it best, until the assignment
stops changing). Baselines: ``svd`` (each adapter's own rank-R truncated SVD, exact from the
factors) and ``ties`` (TIES merge of all deltas, PEFT's trim / sign election / disjoint mean, then its
best rank-R approximation — PEFT's ``ties_svd`` with unit weights).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from .adapters import AdapterCollection, LoadedAdapter, compare_slots, read_adapters
from .bank import METHODS, AdapterBank, SlotWeights
from .lowrank import range_basis, squared_residuals, thin_svd_of_products

WEIGHTINGS = ("unit", "none")
MAX_CLUSTER_ROUNDS = 30
FACTOR_CHUNK = 128
EXACT_SVD_MAX_DIM = 1024
# The start only has to be good enough for the sweeps, which are themselves subspace iterations.
HOSVD_POWER_ITERATIONS = 1
CORE_SWEEPS = 500


@dataclass
class FactoredSlot:
    """N deltas of one slot as thin SVDs: ``M_i = left[:, i] @ diag(sigma[i]) @ right[:, i]ᵀ``.

    ``left [d_out, N, r]`` and ``right [d_in, N, r]`` (orthonormal columns per adapter; zero
    columns where an adapter's rank is below r), ``sigma [N, r]``.
    """

    left: Tensor
    sigma: Tensor
    right: Tensor

    @property
    def count(self) -> int:
        return self.sigma.shape[0]

    @property
    def width(self) -> int:
        return self.sigma.shape[1]

    def flat_left(self) -> Tensor:
        return self.left.reshape(self.left.shape[0], -1)

    def flat_right(self) -> Tensor:
        return self.right.reshape(self.right.shape[0], -1)

    def energy(self) -> Tensor:
        """``‖M_i‖²`` as float64 ``[N]``."""
        return (self.sigma.double() ** 2).sum(dim=1)

    def subset(self, index: Tensor) -> "FactoredSlot":
        index = index.to(self.sigma.device)
        return FactoredSlot(self.left.index_select(1, index), self.sigma.index_select(0, index),
                            self.right.index_select(1, index))


def factor_slot(adapters: Sequence[LoadedAdapter], slot: str, *, dtype: torch.dtype = torch.float32,
                device: Optional[torch.device] = None) -> FactoredSlot:
    """Reads one slot of every adapter (ranks padded with zeros to the largest) and converts it to
    thin SVDs, ``FACTOR_CHUNK`` adapters at a time."""
    infos = [adapter.slots[slot] for adapter in adapters]
    d_out, d_in = infos[0].d_out, infos[0].d_in
    max_rank = max(info.rank for info in infos)
    width = min(max_rank, d_out, d_in)
    count = len(adapters)
    left = torch.empty(d_out, count, width, dtype=dtype, device=device)
    right = torch.empty(d_in, count, width, dtype=dtype, device=device)
    sigma = torch.empty(count, width, dtype=dtype, device=device)
    for start in range(0, count, FACTOR_CHUNK):
        stop = min(start + FACTOR_CHUNK, count)
        lora_b, lora_a = _stacked_factors(adapters[start:stop], slot, max_rank, dtype, device)
        chunk_left, chunk_sigma, chunk_right = thin_svd_of_products(lora_b, lora_a)
        left[:, start:stop] = chunk_left.permute(1, 0, 2)
        right[:, start:stop] = chunk_right.permute(1, 0, 2)
        sigma[start:stop] = chunk_sigma
    return FactoredSlot(left, sigma, right)


def _stacked_factors(adapters: Sequence[LoadedAdapter], slot: str, max_rank: int, dtype: torch.dtype,
                     device: Optional[torch.device]) -> tuple[Tensor, Tensor]:
    """``(s_i lora_B_i [n, d_out, r_max], lora_A_i [n, r_max, d_in])``, zero-padded ranks. One stack
    per tensor rather than a copy per adapter: with many adapters, per-adapter ops dominate."""
    pairs = [adapter.raw_factors(slot) for adapter in adapters]
    pad = lambda t, dim: t if t.shape[dim] == max_rank else torch.nn.functional.pad(  # noqa: E731
        t, (0, max_rank - t.shape[dim]) if dim == 1 else (0, 0, 0, max_rank - t.shape[dim]))
    lora_b = torch.stack([pad(b, 1) for b, _ in pairs]).to(device=device, dtype=dtype)
    lora_a = torch.stack([pad(a, 0) for _, a in pairs]).to(device=device, dtype=dtype)
    scaling = torch.tensor([adapter.slots[slot].scaling for adapter in adapters], dtype=dtype, device=device)
    return lora_b * scaling[:, None, None], lora_a


def adapter_weights(energy: Tensor, weighting: str) -> Tensor:
    """``w_i``: ``1/‖M_i‖²`` ("unit"; 0 for a zero delta, which then plays no part) or 1 ("none")."""
    if weighting == "none":
        return torch.ones_like(energy)
    return torch.where(energy > 0, 1.0 / energy.clamp(min=torch.finfo(torch.float64).tiny), torch.zeros_like(energy))


# ------------------------------------------------------------------------------------- JD-Full
@dataclass
class Fit:
    """Bases of one cluster and how the fit went: ``loss`` is the weighted relative loss
    ``Σ w_i ‖M_i − U Σ_i Vᵀ‖² / Σ w_i ‖M_i‖²`` at the start and after every sweep.
    ``across_left [n, r, R] = P_iᵀ U`` and ``across_right = Q_iᵀ V`` for the fitted adapters (kept:
    the cores and errors need them, and they cost a GEMM each)."""

    basis_left: Tensor
    basis_right: Tensor
    loss: list[float]
    across_left: Tensor
    across_right: Tensor

    @property
    def sweeps(self) -> int:
        return len(self.loss) - 1


def hosvd_start(factored: FactoredSlot, weights: Tensor, rank: int, generator: torch.Generator
                ) -> tuple[Tensor, Tensor]:
    """Top-R left singular subspaces of ``[√w_i M_i]_i`` (U) and ``[√w_i M_iᵀ]_i`` (V), via
    :func:`~lolakernels.compress.lowrank.range_basis` on ``P diag(√w s)`` and ``Q diag(√w s)``."""
    scaled = (factored.sigma * weights.sqrt().to(factored.sigma.dtype)[:, None]).reshape(-1, 1)
    bases = []
    for flat in (factored.flat_left(), factored.flat_right()):
        bases.append(range_basis(lambda x, flat=flat: flat @ (scaled * x),
                                 lambda y, flat=flat: scaled * (flat.mT @ y),
                                 flat.shape[0], flat.shape[1], rank, generator=generator, dtype=flat.dtype,
                                 device=flat.device, power_iterations=HOSVD_POWER_ITERATIONS))
    return bases[0], bases[1]


def _project(flat: Tensor, basis: Tensor, count: int) -> Tensor:
    """``[N, r, R]`` stack of ``P_iᵀ U`` (one GEMM on the side-by-side factors)."""
    return (flat.mT @ basis).reshape(count, -1, basis.shape[1])


def _cores(across_left: Tensor, scaled_sigma: Tensor, across_right: Tensor) -> Tensor:
    """``[N, R, R]`` stack of ``(P_iᵀU)ᵀ S_i (Q_iᵀV) = Uᵀ M_i V``."""
    return (across_left * scaled_sigma[:, :, None]).mT @ across_right


def _captured(cores: Tensor) -> float:
    """``Σ_i ‖core_i‖²``, accumulated in float64."""
    return float(torch.linalg.vector_norm(cores.flatten(), dtype=torch.float64) ** 2)


def apply_gram(flat: Tensor, scaled_sigma: Tensor, across_self: Tensor, across_other: Tensor) -> Tensor:
    """``G B`` for one side, through the factors: for the U side (``flat = P``, ``across_self = [P_iᵀ B]``,
    ``across_other = [X_i] = [Q_iᵀ V]``) ``G_U B = Σ_i P_i (S_i X_i)(X_iᵀ S_i P_iᵀ B)``; the V side swaps
    P and Q. ``S_i`` = diag(``scaled_sigma[i]``) (``√w_i s_i``). One GEMM of ``d × N·r × k``."""
    other = scaled_sigma[:, :, None] * across_other                        # S_i X_i        [n, r, R]
    coupling = other.mT @ across_self                                      # X_iᵀ S_i P_iᵀ B [n, R, k]
    return flat @ (other @ coupling).reshape(-1, across_self.shape[2])


def jd_full_half_step(flat: Tensor, scaled_sigma: Tensor, basis: Tensor, across_self: Tensor, across_other: Tensor,
                      previous: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor]:
    """One half-sweep of JD-Full: ``(U', [P_iᵀ U'])`` with U' the best R-dimensional subspace of
    ``span[U, G_U U, W]`` for ``tr(U'ᵀ G_U U')`` (Rayleigh–Ritz), W = the previous basis of this side
    (``previous = (basis, across)``, as in LOBPCG: it carries the direction of the last step). U lies
    in that space, so the objective cannot drop, and the extra blocks make each step close to the
    exact top-R eigenspace that a full HOOI step computes. GEMMs: ``G U``, then ``P_iᵀ E`` and ``G E``
    per extra block E (the previous basis's projections are passed in). With ``2R > d`` there is
    no room for a block: a subspace-iteration step."""
    count, rank = across_self.shape[0], basis.shape[1]
    pushed = apply_gram(flat, scaled_sigma, across_self, across_other)
    if 2 * rank > basis.shape[0]:
        new_basis, _ = torch.linalg.qr(pushed)
        return new_basis, _project(flat, new_basis, count)
    candidates = [pushed]
    if previous is not None and 3 * rank <= basis.shape[0]:
        candidates.append(previous[0])
    blocks, block_across, block_pushed = [basis], [across_self], [pushed]
    for candidate in candidates:
        found = torch.cat(blocks, dim=1)
        extra = candidate - found @ (found.mT @ candidate)
        for _ in range(2):  # twice: Householder Q of a tiny residual is not orthogonal to the rest to working precision
            extra, _ = torch.linalg.qr(extra)
            extra = extra - found @ (found.mT @ extra)
        extra, _ = torch.linalg.qr(extra)
        extra_across = _project(flat, extra, count)
        blocks.append(extra)
        block_across.append(extra_across)
        block_pushed.append(apply_gram(flat, scaled_sigma, extra_across, across_other))
    krylov = torch.cat(blocks, dim=1)
    ritz = (krylov.mT @ torch.cat(block_pushed, dim=1)).double()
    _, vectors = torch.linalg.eigh((ritz + ritz.mT) / 2)
    top = vectors.flip(-1)[:, :rank].to(basis.dtype)
    # Re-orthonormalise (rounding), carrying the projections along: P_iᵀ(K E T⁻¹) = (P_iᵀ K) E T⁻¹.
    new_basis, triangle = torch.linalg.qr(krylov @ top)
    new_across = torch.cat(block_across, dim=2) @ top
    new_across = torch.linalg.solve_triangular(triangle, new_across, upper=True, left=False)
    return new_basis, new_across


def fit_jd_full(factored: FactoredSlot, weights: Tensor, rank: int, *, max_iters: int, tol: float,
                generator: torch.Generator, start: Optional[tuple[Tensor, Tensor]] = None) -> Fit:
    """Orthonormal ``U [d_out, R]``, ``V [d_in, R]`` maximising ``Σ_i w_i ‖Uᵀ M_i V‖²`` (module docstring)."""
    count = factored.count
    scaled = factored.sigma * weights.sqrt().to(factored.sigma.dtype)[:, None]
    total = float((weights * factored.energy()).sum())
    basis_left, basis_right = start if start is not None else hosvd_start(factored, weights, rank, generator)
    across_left = _project(factored.flat_left(), basis_left, count)
    across_right = _project(factored.flat_right(), basis_right, count)
    captured = _captured(_cores(across_left, scaled, across_right))
    relative = lambda f: 1.0 - f / total if total > 0 else 0.0  # noqa: E731
    loss = [relative(captured)]
    previous_left = previous_right = None
    for _ in range(max_iters):
        before = captured
        # Each half-step is kept only if f did not drop in floating point (it cannot in exact arithmetic).
        candidate, candidate_across = jd_full_half_step(factored.flat_left(), scaled, basis_left, across_left,
                                                        across_right, previous_left)
        value = _captured(_cores(candidate_across, scaled, across_right))
        if value >= captured:
            previous_left = (basis_left, across_left)
            basis_left, across_left, captured = candidate, candidate_across, value
        candidate, candidate_across = jd_full_half_step(factored.flat_right(), scaled, basis_right, across_right,
                                                        across_left, previous_right)
        value = _captured(_cores(across_left, scaled, candidate_across))
        if value >= captured:
            previous_right = (basis_right, across_right)
            basis_right, across_right, captured = candidate, candidate_across, value
        loss.append(relative(captured))
        if captured - before <= tol * total:
            break
    return Fit(basis_left, basis_right, loss, across_left, across_right)


def full_cores(factored: FactoredSlot, basis_left: Tensor, basis_right: Tensor) -> Tensor:
    """``Σ_i = Uᵀ M_i V`` ``[N, R, R]`` (unweighted)."""
    count = factored.count
    return _cores(_project(factored.flat_left(), basis_left, count), factored.sigma,
                  _project(factored.flat_right(), basis_right, count))


# ------------------------------------------------------------------------------------- JD-Diag
def _diagonals(across_left: Tensor, scaled_sigma: Tensor, across_right: Tensor) -> Tensor:
    """``[N, R]``: ``diag(Uᵀ M_i V)_k = Σ_j (P_iᵀU)_jk s_ij (Q_iᵀV)_jk``."""
    return torch.einsum("njk,nj,njk->nk", across_left, scaled_sigma, across_right)


def diag_solve(basis_left: Tensor, basis_right: Tensor, diagonals: Tensor) -> Tensor:
    """``σ_i = G⁺ diag(Uᵀ M_i V)`` with ``G = (UᵀU) ⊙ (VᵀV)``: the least-squares diagonal core of
    each adapter on bases U, V (rows of ``diagonals [N, R]``)."""
    gram = (basis_left.mT @ basis_left) * (basis_right.mT @ basis_right)
    return diagonals @ torch.linalg.pinv(gram.double(), hermitian=True).to(diagonals.dtype)


def _diag_loss(total: float, basis_left: Tensor, basis_right: Tensor, diagonals: Tensor, sigmas: Tensor) -> float:
    """``Σ_i ‖M_i‖² − 2 σ_iᵀ b_i + σ_iᵀ G σ_i`` in float64."""
    gram = ((basis_left.mT @ basis_left) * (basis_right.mT @ basis_right)).double()
    sigmas, diagonals = sigmas.double(), diagonals.double()
    return total - 2 * float((sigmas * diagonals).sum()) + float(((sigmas @ gram) * sigmas).sum())


def jd_diag_left_step(factored: FactoredSlot, scaled_sigma: Tensor, across_right: Tensor, basis_right: Tensor,
                      sigmas: Tensor) -> Tensor:
    """Least-squares U for fixed V, σ: ``U = (Σ_i M_i V D_i) H⁺``, ``H = (VᵀV) ⊙ Σ_i σ_i σ_iᵀ``."""
    pushed = scaled_sigma[:, :, None] * across_right * sigmas[:, None, :]
    numerator = factored.flat_left() @ pushed.reshape(-1, pushed.shape[2])
    hessian = (basis_right.mT @ basis_right).double() * (sigmas.mT @ sigmas).double()
    return numerator @ torch.linalg.pinv(hessian, hermitian=True).to(numerator.dtype)


def jd_diag_right_step(factored: FactoredSlot, scaled_sigma: Tensor, across_left: Tensor, basis_left: Tensor,
                       sigmas: Tensor) -> Tensor:
    """Least-squares V for fixed U, σ: ``V = (Σ_i M_iᵀ U D_i) H⁺``, ``H = (UᵀU) ⊙ Σ_i σ_i σ_iᵀ``."""
    pushed = scaled_sigma[:, :, None] * across_left * sigmas[:, None, :]
    numerator = factored.flat_right() @ pushed.reshape(-1, pushed.shape[2])
    hessian = (basis_left.mT @ basis_left).double() * (sigmas.mT @ sigmas).double()
    return numerator @ torch.linalg.pinv(hessian, hermitian=True).to(numerator.dtype)


def _unit_columns(basis: Tensor) -> tuple[Tensor, Tensor]:
    norms = basis.norm(dim=0)
    norms = torch.where(norms > 0, norms, torch.ones_like(norms))
    return basis / norms, norms


def fit_jd_diag(factored: FactoredSlot, weights: Tensor, rank: int, *, max_iters: int, tol: float,
                generator: torch.Generator, start: Optional[tuple[Tensor, Tensor]] = None) -> Fit:
    """U, V (unit columns) minimising ``Σ_i w_i ‖M_i − U diag(σ_i) Vᵀ‖²`` by ALS (module docstring),
    from ``start`` or else from :func:`jd_diag_start`."""
    if start is None:
        start = jd_diag_start(factored, weights, rank, max_iters=max_iters, tol=tol, generator=generator)
    return _alternating_least_squares(factored, weights, start, max_iters=max_iters, tol=tol)


def jd_diag_start(factored: FactoredSlot, weights: Tensor, rank: int, *, max_iters: int, tol: float,
                  generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Start for JD-Diag in the spirit of CANDELINC: fit JD-Full (``U``, ``V`` orthonormal), run the
    same ALS on its small cores ``K_i = Uᵀ M_i V`` ``[N, R, R]`` (each sweep O(N·R³), no d-sized
    work: plain ALS needs many sweeps), and lift the result back: ``(U A, V B)``."""
    tucker = fit_jd_full(factored, weights, rank, max_iters=max_iters, tol=tol, generator=generator)
    cores = _cores(tucker.across_left, factored.sigma, tucker.across_right)
    u, s, vh = torch.linalg.svd(cores)
    small = FactoredSlot(u.permute(1, 0, 2).contiguous(), s, vh.mT.permute(1, 0, 2).contiguous())
    inner = _alternating_least_squares(small, weights, hosvd_start(small, weights, rank, generator),
                                       max_iters=CORE_SWEEPS, tol=tol)
    return tucker.basis_left @ inner.basis_left, tucker.basis_right @ inner.basis_right


def _alternating_least_squares(factored: FactoredSlot, weights: Tensor, start: tuple[Tensor, Tensor], *,
                               max_iters: int, tol: float) -> Fit:
    """JD-Diag ALS sweeps (σ, U, V) from ``start``, each followed by an extrapolation along the
    sweep's step, ``B + α (B − B_before)`` with ``α = sweep^{1/3}`` (Bro's line search for CP-ALS),
    kept only if it lowers the loss. Projections are linear in the bases, so trying it costs no
    d-sized GEMM."""
    count = factored.count
    scaled = factored.sigma * weights.sqrt().to(factored.sigma.dtype)[:, None]
    total = float((weights * factored.energy()).sum())
    # Unit columns keep U and V well scaled; σ absorbs the norms (the product is unchanged).
    basis_left, left_norms = _unit_columns(start[0])
    basis_right, right_norms = _unit_columns(start[1])
    across_left = _project(factored.flat_left(), basis_left, count)
    across_right = _project(factored.flat_right(), basis_right, count)
    diagonals = _diagonals(across_left, scaled, across_right)
    sigmas = diag_solve(basis_left, basis_right, diagonals)
    relative = lambda value: value / total if total > 0 else 0.0  # noqa: E731
    current = _diag_loss(total, basis_left, basis_right, diagonals, sigmas)
    loss = [relative(current)]
    for sweep in range(1, max_iters + 1):
        before = current
        earlier = (basis_left, basis_right, across_left, across_right)
        earlier_cores = (diagonals, sigmas)
        basis_left = jd_diag_left_step(factored, scaled, across_right, basis_right, sigmas)
        across_left = _project(factored.flat_left(), basis_left, count)
        basis_right = jd_diag_right_step(factored, scaled, across_left, basis_left, sigmas)
        basis_left, left_norms = _unit_columns(basis_left)
        basis_right, right_norms = _unit_columns(basis_right)
        across_left = across_left / left_norms
        across_right = _project(factored.flat_right(), basis_right, count)
        diagonals = _diagonals(across_left, scaled, across_right)
        sigmas = diag_solve(basis_left, basis_right, diagonals)
        current = _diag_loss(total, basis_left, basis_right, diagonals, sigmas)
        step = sweep ** (1 / 3)
        moved = [now + step * (now - then)
                 for now, then in zip((basis_left, basis_right, across_left, across_right), earlier)]
        moved[0], left_norms = _unit_columns(moved[0])
        moved[1], right_norms = _unit_columns(moved[1])
        moved[2], moved[3] = moved[2] / left_norms, moved[3] / right_norms
        moved_diagonals = _diagonals(moved[2], scaled, moved[3])
        moved_sigmas = diag_solve(moved[0], moved[1], moved_diagonals)
        moved_loss = _diag_loss(total, moved[0], moved[1], moved_diagonals, moved_sigmas)
        if moved_loss < current:
            basis_left, basis_right, across_left, across_right = moved
            diagonals, sigmas, current = moved_diagonals, moved_sigmas, moved_loss
        if current > before:
            # Exact ALS steps cannot raise the loss; a rise is fp32 rounding at convergence: keep the
            # earlier state, so the recorded loss never increases.
            basis_left, basis_right, across_left, across_right = earlier
            (diagonals, sigmas), current = earlier_cores, before
        loss.append(relative(current))
        if before - current <= tol * total:
            break
    return Fit(basis_left, basis_right, loss, across_left, across_right)


def diag_cores(factored: FactoredSlot, basis_left: Tensor, basis_right: Tensor) -> Tensor:
    """``σ_i`` ``[N, R]`` of each adapter on bases U, V (unweighted)."""
    count = factored.count
    diagonals = _diagonals(_project(factored.flat_left(), basis_left, count), factored.sigma,
                           _project(factored.flat_right(), basis_right, count))
    return diag_solve(basis_left, basis_right, diagonals)


# ------------------------------------------------------------------------------------- errors
def relative_errors(factored: FactoredSlot, basis_left: Tensor, cores: Tensor, basis_right: Tensor) -> Tensor:
    """``‖M_i − U K_i Vᵀ‖² / ‖M_i‖²`` float64 ``[N]`` (0 where ``M_i = 0`` and ``K_i = 0``) for any U, V:
    with ``U = Q_u T_u``, ``V = Q_v T_v`` (QR) it is the cancellation-free
    :func:`~lolakernels.compress.lowrank.squared_residuals` on ``Q_u``, ``T_u K_i T_vᵀ``, ``Q_v``."""
    if cores.dim() == 2:
        cores = torch.diag_embed(cores)
    q_left, t_left = torch.linalg.qr(basis_left)
    q_right, t_right = torch.linalg.qr(basis_right)
    residual = squared_residuals(factored.left, factored.sigma, factored.right, q_left, q_right,
                                 t_left @ cores @ t_right.mT)
    energy = factored.energy()
    return torch.where(energy > 0, residual / energy.clamp(min=torch.finfo(torch.float64).tiny), residual)


def _projection_errors(method: str, factored: FactoredSlot, basis_left: Tensor, basis_right: Tensor) -> Tensor:
    """Relative error of each adapter projected onto one basis pair (for cluster assignment: the
    cheap difference of squared norms, accurate enough to compare bases)."""
    energy = factored.energy()
    if method == "jd-full":
        captured = (full_cores(factored, basis_left, basis_right).double() ** 2).sum(dim=(1, 2))
        residual = (energy - captured).clamp(min=0)
    else:
        count = factored.count
        diagonals = _diagonals(_project(factored.flat_left(), basis_left, count), factored.sigma,
                               _project(factored.flat_right(), basis_right, count)).double()
        gram = ((basis_left.mT @ basis_left) * (basis_right.mT @ basis_right)).double()
        captured = ((diagonals @ torch.linalg.pinv(gram, hermitian=True)) * diagonals).sum(dim=1)
        residual = (energy - captured).clamp(min=0)
    return torch.where(energy > 0, residual / energy.clamp(min=torch.finfo(torch.float64).tiny), residual)


# ------------------------------------------------------------------------------------- clusters
@dataclass
class ClusterFit:
    """Per-slot result: bases per cluster, cluster of each adapter, fits, rounds of reassignment."""

    fits: list[Fit]
    assignment: Tensor  # [N] int64
    rounds: int


def _single_adapter_basis(factored: FactoredSlot, index: int, rank: int, generator: torch.Generator
                          ) -> tuple[Tensor, Tensor]:
    """An adapter's own top singular vectors, completed to R orthonormal columns (seed of a cluster)."""
    bases = []
    for side in (factored.left, factored.right):
        own = side[:, index, :min(rank, side.shape[2])]
        if own.shape[1] < rank:
            filler = torch.randn(side.shape[0], rank - own.shape[1], generator=generator, dtype=side.dtype)
            own = torch.cat([own, filler.to(side.device)], dim=1)
        basis, _ = torch.linalg.qr(own)
        bases.append(basis)
    return bases[0], bases[1]


def _fit(method: str, factored: FactoredSlot, weights: Tensor, rank: int, max_iters: int, tol: float,
         generator: torch.Generator, start=None) -> Fit:
    fit_fn = fit_jd_full if method == "jd-full" else fit_jd_diag
    return fit_fn(factored, weights, rank, max_iters=max_iters, tol=tol, generator=generator, start=start)


def fit_clusters(method: str, factored: FactoredSlot, weights: Tensor, rank: int, clusters: int, *, max_iters: int,
                 tol: float, generator: torch.Generator) -> ClusterFit:
    """k-subspaces: seed k bases from single adapters (the first uniformly at random, each next one
    with probability proportional to its error on the bases so far), assign each adapter to its best
    basis, then alternate fitting a basis per cluster (warm-started) and reassigning, until the
    assignment stops changing (at most ``MAX_CLUSTER_ROUNDS`` rounds)."""
    count = factored.count
    if clusters == 1:
        fit = _fit(method, factored, weights, rank, max_iters, tol, generator)
        return ClusterFit([fit], torch.zeros(count, dtype=torch.long), 0)
    energy = factored.energy().cpu()
    seeds: list[int] = [int(torch.randint(count, (1,), generator=generator))]
    bases = [_single_adapter_basis(factored, seeds[0], rank, generator)]
    errors = _projection_errors(method, factored, *bases[0]).cpu()[:, None]
    while len(bases) < clusters:
        best = errors.min(dim=1).values * (energy > 0)
        best[seeds] = 0
        if float(best.sum()) > 0:
            seed = int(torch.multinomial(best / best.sum(), 1, generator=generator))
        else:
            seed = next(i for i in range(count) if i not in seeds)
        seeds.append(seed)
        bases.append(_single_adapter_basis(factored, seed, rank, generator))
        errors = torch.cat([errors, _projection_errors(method, factored, *bases[-1]).cpu()[:, None]], dim=1)
    assignment = errors.argmin(dim=1)
    fits: list[Optional[Fit]] = [None] * clusters
    rounds = 0
    for rounds in range(1, MAX_CLUSTER_ROUNDS + 1):
        for cluster in range(clusters):
            members = (assignment == cluster).nonzero().flatten()
            if members.numel() == 0:
                # An empty cluster takes the adapter its current basis fits worst (from a cluster of 2+).
                sizes = torch.bincount(assignment, minlength=clusters)
                own_error = errors.gather(1, assignment[:, None]).flatten()
                own_error[sizes[assignment] < 2] = -1
                moved = int(own_error.argmax())
                assignment[moved] = cluster
                members = torch.tensor([moved])
                bases[cluster] = _single_adapter_basis(factored, moved, rank, generator)
            fits[cluster] = _fit(method, factored.subset(members), weights[members.to(weights.device)], rank,
                                 max_iters, tol, generator, start=bases[cluster])
            bases[cluster] = (fits[cluster].basis_left, fits[cluster].basis_right)
        errors = torch.stack([_projection_errors(method, factored, *basis).cpu() for basis in bases], dim=1)
        current = errors.gather(1, assignment[:, None]).flatten()
        best_error, best_cluster = errors.min(dim=1)
        # Move only on a clear improvement, so rounding cannot make two bases trade an adapter forever.
        moves = best_error < current * (1 - 1e-9) - 1e-12
        if not bool(moves.any()):
            break
        assignment = torch.where(moves, best_cluster, assignment)
    else:
        # Out of rounds: refit on the final assignment so bases and assignment agree.
        for cluster in range(clusters):
            members = (assignment == cluster).nonzero().flatten()
            if members.numel():
                fits[cluster] = _fit(method, factored.subset(members), weights[members.to(weights.device)], rank,
                                     max_iters, tol, generator, start=bases[cluster])
    return ClusterFit(fits, assignment, rounds)


def _mean_error(method: str, factored: FactoredSlot, result: ClusterFit) -> float:
    errors = torch.stack([_projection_errors(method, factored, f.basis_left, f.basis_right).cpu()
                          for f in result.fits], dim=1)
    return float(errors.gather(1, result.assignment[:, None]).mean())


def fit_clusters_auto(method: str, factored: FactoredSlot, weights: Tensor, rank: int, target_error: float, *,
                      max_iters: int, tol: float, seed: int, slot: str) -> tuple[ClusterFit, dict[int, float]]:
    """The smallest k whose k-subspaces fit has mean relative error ≤ ``target_error``: k = 1, 2, 4, …
    until one reaches it, then bisection below it. One basis per adapter reaches each adapter's own
    rank-R truncation error; if even that misses the target, ``ValueError``."""
    count = factored.count
    tail = (factored.sigma[:, rank:].double() ** 2).sum(dim=1)
    energy = factored.energy()
    floor = float(torch.where(energy > 0, tail / energy.clamp(min=torch.finfo(torch.float64).tiny), tail).mean())
    if floor > target_error:
        raise ValueError(f"target_error={target_error:g} cannot be reached in slot {slot!r} at rank {rank}: even one "
                         f"basis per adapter leaves a mean relative error of {floor:.4g}")
    tried: dict[int, tuple[ClusterFit, float]] = {}

    def attempt(k: int) -> bool:
        generator = torch.Generator().manual_seed(seed * 7919 + k)
        result = fit_clusters(method, factored, weights, rank, k, max_iters=max_iters, tol=tol, generator=generator)
        tried[k] = (result, _mean_error(method, factored, result))
        return tried[k][1] <= target_error or k == count

    low, high = 0, 1
    while not attempt(high):
        low, high = high, min(2 * high, count)
    while high - low > 1:
        middle = (low + high) // 2
        if attempt(middle):
            high = middle
        else:
            low = middle
    return tried[high][0], {k: error for k, (_, error) in sorted(tried.items())}


# ------------------------------------------------------------------------------------- baselines
def svd_slot(factored: FactoredSlot, rank: int) -> tuple[SlotWeights, Tensor]:
    """Per-adapter rank-R truncated SVD: C = N, ``lora_b[i] = P_i[:, :R]``, ``lora_a[i] = Q_i[:, :R]ᵀ``,
    ``sigma[i] = s_i[:R]`` (zero-padded when r < R). Error: the tail ``Σ_{j≥R} s_ij² / ‖s_i‖²``."""
    count, width = factored.count, factored.width
    keep = min(rank, width)
    d_out, d_in = factored.left.shape[0], factored.right.shape[0]
    lora_b = torch.zeros(count, d_out, rank)
    lora_a = torch.zeros(count, rank, d_in)
    sigma = torch.zeros(count, rank)
    lora_b[:, :, :keep] = factored.left[:, :, :keep].permute(1, 0, 2).cpu().float()
    lora_a[:, :keep] = factored.right[:, :, :keep].permute(1, 2, 0).cpu().float()
    sigma[:, :keep] = factored.sigma[:, :keep].cpu().float()
    tail = (factored.sigma[:, keep:].double() ** 2).sum(dim=1).cpu()
    energy = factored.energy().cpu()
    errors = torch.where(energy > 0, tail / energy.clamp(min=torch.finfo(torch.float64).tiny), tail)
    return SlotWeights(lora_a, lora_b, sigma, torch.arange(count, dtype=torch.int32)), errors


def ties_merged_delta(adapters: Sequence[LoadedAdapter], slot: str, density: float, *, dtype: torch.dtype,
                      device: Optional[torch.device]) -> Tensor:
    """TIES merge of the slot's deltas with unit weights, streaming one dense delta at a time:
    trim each ``M_i`` to its ``density`` largest-magnitude entries (PEFT's ``prune``), elect each
    entry's sign from the sum of the trimmed deltas, and average the trimmed entries that agree with
    it (PEFT's ``ties`` with ``majority_sign_method="total"``, without stacking N dense deltas)."""
    from peft.utils.merge_utils import prune

    def trimmed(adapter: LoadedAdapter) -> Tensor:
        lora_b, lora_a = adapter.factors(slot, dtype, device)
        return prune(lora_b @ lora_a, density, method="magnitude")

    total = None
    for adapter in adapters:
        delta = trimmed(adapter)
        total = delta if total is None else total.add_(delta)
    majority = torch.where(total >= 0, 1.0, -1.0).to(total.dtype)
    summed = torch.zeros_like(total)
    agreeing = torch.zeros_like(total)
    for adapter in adapters:
        delta = trimmed(adapter)
        agrees = (delta.sign() == majority).to(delta.dtype)
        summed.add_(delta * agrees)
        agreeing.add_(agrees)
    return summed / agreeing.clamp(min=1.0)


def top_singular(matrix: Tensor, rank: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Rank-R truncated SVD of a dense matrix: exact (LAPACK) up to ``EXACT_SVD_MAX_DIM``, else a
    seeded randomized range finder and the SVD of the small projection."""
    if min(matrix.shape) <= EXACT_SVD_MAX_DIM:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    basis = range_basis(matrix.__matmul__, lambda y: matrix.mT @ y, matrix.shape[0], matrix.shape[1], rank,
                        generator=generator, dtype=matrix.dtype, device=matrix.device)
    u_small, s, vh = torch.linalg.svd(basis.mT @ matrix, full_matrices=False)
    return basis @ u_small[:, :rank], s[:rank], vh[:rank]


def ties_slot(adapters: Sequence[LoadedAdapter], factored: FactoredSlot, slot: str, rank: int, density: float,
              generator: torch.Generator, device: Optional[torch.device]) -> tuple[SlotWeights, Tensor]:
    """One merged delta for all: ``lora_b[0] = U_R S_R``, ``lora_a[0] = V_Rᵀ``, ``Σ_i = I``."""
    merged = ties_merged_delta(adapters, slot, density, dtype=factored.sigma.dtype, device=device)
    u, s, vh = top_singular(merged, rank, generator)
    keep = s.shape[0]
    lora_b = torch.zeros(1, merged.shape[0], rank)
    lora_a = torch.zeros(1, rank, merged.shape[1])
    lora_b[0, :, :keep] = (u * s).cpu().float()
    lora_a[0, :keep] = vh.cpu().float()
    count = factored.count
    sigma = torch.ones(count, rank)
    errors = relative_errors(factored, lora_b[0].to(u), sigma.to(u), lora_a[0].mT.to(u)).cpu()
    return SlotWeights(lora_a, lora_b, sigma, torch.zeros(count, dtype=torch.int32)), errors


# ------------------------------------------------------------------------------------- per slot
def _slot_weights(method: str, factored: FactoredSlot, result: ClusterFit, rank: int) -> tuple[SlotWeights, Tensor]:
    """Bank tensors of a JD fit (CPU fp32) and the exact relative error of each adapter."""
    count = factored.count
    full = method == "jd-full"
    sigma = torch.zeros((count, rank, rank) if full else (count, rank))
    errors = torch.zeros(count, dtype=torch.float64)
    for cluster, fit in enumerate(result.fits):
        members = (result.assignment == cluster).nonzero().flatten()
        if members.numel() == 0:
            continue
        part = factored if members.numel() == count else factored.subset(members)
        if full:
            cores = _cores(fit.across_left, part.sigma, fit.across_right)
            residual = squared_residuals(part.left, part.sigma, part.right, fit.basis_left, fit.basis_right, cores,
                                         across_left=fit.across_left, across_right=fit.across_right)
            energy = part.energy()
            error = torch.where(energy > 0, residual / energy.clamp(min=torch.finfo(torch.float64).tiny), residual)
        else:
            cores = diag_solve(fit.basis_left, fit.basis_right,
                               _diagonals(fit.across_left, part.sigma, fit.across_right))
            error = relative_errors(part, fit.basis_left, cores, fit.basis_right)
        sigma[members] = cores.cpu().float()
        errors[members] = error.cpu()
    lora_b = torch.stack([fit.basis_left.cpu().float() for fit in result.fits])
    lora_a = torch.stack([fit.basis_right.mT.cpu().float() for fit in result.fits]).contiguous()
    return SlotWeights(lora_a, lora_b, sigma, result.assignment.to(torch.int32)), errors


def project_onto_slot(method: str, weights: SlotWeights, adapter: LoadedAdapter, slot: str
                      ) -> tuple[SlotWeights, Tensor]:
    """The slot's tensors with ``adapter`` appended, projected onto the frozen bases (see
    :meth:`AdapterBank.add_adapter`), and its relative error ``[1]``."""
    factored = factor_slot([adapter], slot)
    rank = weights.lora_a.shape[1]
    if method == "svd":
        own, error = svd_slot(factored, rank)
        return SlotWeights(torch.cat([weights.lora_a, own.lora_a]), torch.cat([weights.lora_b, own.lora_b]),
                           torch.cat([weights.sigma, own.sigma]),
                           torch.arange(weights.basis_of.numel() + 1, dtype=torch.int32)), error
    best = None
    for cluster in range(weights.lora_a.shape[0]):
        basis_left, basis_right = weights.lora_b[cluster], weights.lora_a[cluster].mT
        if method == "jd-full":
            core = full_cores(factored, basis_left, basis_right)
        elif method == "jd-diag":
            core = diag_cores(factored, basis_left, basis_right)
        else:
            core = torch.ones(1, rank)
        error = relative_errors(factored, basis_left, core, basis_right)
        if best is None or float(error) < float(best[2]):
            best = (cluster, core, error)
    cluster, core, error = best
    return SlotWeights(weights.lora_a, weights.lora_b, torch.cat([weights.sigma, core.float()]),
                       torch.cat([weights.basis_of, torch.tensor([cluster], dtype=torch.int32)])), error


def check_matches_bank(adapter: LoadedAdapter, bank: AdapterBank) -> None:
    """ValueError unless the adapter targets the bank's base model, slots and shapes."""
    if adapter.base_model != bank.base_model:
        raise ValueError(f"adapter {adapter.name!r} targets base model {adapter.base_model!r} but the bank holds "
                         f"adapters of {bank.base_model!r}")
    compare_slots(adapter.name, {s: (i.d_out, i.d_in) for s, i in adapter.slots.items()},
                  {slot: bank.slot_shape(slot) for slot in bank.slots}, "the bank")


# ------------------------------------------------------------------------------------- public API
def _check_arguments(rank, method, clusters, weighting, max_iters, tol, seed, target_error, density, count):
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be an int, got {type(rank).__name__}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if clusters == "auto":
        if target_error is None:
            raise ValueError("clusters='auto' needs target_error= (the mean relative error to reach)")
        if isinstance(target_error, bool) or not isinstance(target_error, (int, float)) \
                or not math.isfinite(target_error) or target_error < 0:
            raise ValueError(f"target_error must be a finite float >= 0, got {target_error!r}")
    else:
        if isinstance(clusters, bool) or not isinstance(clusters, int):
            raise TypeError(f"clusters must be an int or 'auto', got {clusters!r}")
        if clusters < 1:
            raise ValueError(f"clusters must be >= 1, got {clusters}")
        if target_error is not None:
            raise ValueError("target_error is only used with clusters='auto'")
    if clusters != 1 and method in ("svd", "ties"):
        raise ValueError(f"clusters applies to jd-full and jd-diag; method {method!r} takes clusters=1 "
                         "(svd has one basis per adapter, ties one merged delta)")
    if isinstance(clusters, int) and clusters > count:
        raise ValueError(f"clusters={clusters} exceeds the number of adapters ({count})")
    if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 0:
        raise ValueError(f"max_iters must be an int >= 0, got {max_iters!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
        raise ValueError(f"tol must be a finite float >= 0, got {tol!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density!r}")


def compress_adapters(adapters: Any, rank: int, *, method: str = "jd-full", clusters: Union[int, str] = 1,
                      weighting: str = "unit", max_iters: int = 100, tol: float = 1e-6, seed: int = 0,
                      device: Union[str, torch.device, None] = None, progress: bool = True,
                      target_error: Optional[float] = None, density: float = 0.2) -> AdapterBank:
    """Compresses a LoRA collection into an :class:`~lolakernels.AdapterBank` of rank R.

    Per slot (adapted module) it fits bases ``U_c [d_out, R]``, ``V_c [d_in, R]`` per cluster c and
    a core ``Σ_i`` per adapter so that ``M_i = s_i B_i A_i ≈ U_c Σ_i V_cᵀ`` (see the module docstring
    for the objective and the updates); the bank stores ``lora_b = U``, ``lora_a = Vᵀ``, ``sigma``.

    Args:
        adapters: PEFT adapter directories (an adapter is named by its directory's base name) or a
            dict name -> (LoraConfig or its dict, state dict). All must target the same base model
            and slots with the same shapes (else ``ValueError`` naming the adapter and slot). Ranks
            and alphas may differ; rsLoRA, ``rank_pattern`` and ``alpha_pattern`` are honoured.
        rank: R, at most ``min(d_out, d_in)`` of every slot.
        method: ``"jd-full"`` (orthonormal U, V, full Σ_i ``[R, R]``), ``"jd-diag"`` (Σ_i diagonal),
            ``"svd"`` (per-adapter truncated SVD) or ``"ties"`` (one TIES-merged delta for all).
        clusters: k bases per slot (k-subspaces), or ``"auto"`` with ``target_error``: the smallest k
            (per slot) whose mean squared relative error is ≤ ``target_error``.
        weighting: ``"unit"`` (``w_i = 1/‖M_i‖²``, every adapter counts equally) or ``"none"``.
        max_iters, tol: at most ``max_iters`` sweeps per fit; stop once a sweep improves the
            weighted loss by ≤ ``tol · Σ w_i ‖M_i‖²``.
        seed: seeds every random choice (range finder, cluster seeding): same inputs, same bank.
        device: where to compute (default CPU); the bank is returned on the CPU in fp32.
        progress: a tqdm progress bar over slots.
        target_error: see ``clusters``.
        density: fraction of entries TIES keeps per delta (method ``"ties"`` only).

    Memory per slot is O((d_in + d_out)·(N·r + R)) (the factors and bases); slots are processed one
    at a time.
    """
    from tqdm.auto import tqdm

    collection: AdapterCollection = read_adapters(adapters)
    count = len(collection.adapters)
    _check_arguments(rank, method, clusters, weighting, max_iters, tol, seed, target_error, density, count)
    for slot, (d_out, d_in) in collection.slots.items():
        if rank > min(d_out, d_in):
            raise ValueError(f"rank={rank} exceeds min(d_out, d_in) = {min(d_out, d_in)} of slot {slot!r} "
                             f"([d_out, d_in] = [{d_out}, {d_in}])")
    device = torch.device(device) if device is not None else torch.device("cpu")
    slot_weights, errors, slot_log = {}, {}, {}
    for index, slot in enumerate(tqdm(list(collection.slots), desc=f"compress ({method}, R={rank})",
                                      unit="slot", disable=not progress)):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        factored = factor_slot(collection.adapters, slot, device=device)
        if method == "svd":
            slot_weights[slot], errors[slot] = svd_slot(factored, rank)
            slot_log[slot] = {}
        elif method == "ties":
            slot_weights[slot], errors[slot] = ties_slot(collection.adapters, factored, slot, rank, density,
                                                         generator, device)
            slot_log[slot] = {"density": density}
        else:
            weights = adapter_weights(factored.energy(), weighting)
            tried = None
            if clusters == "auto":
                result, tried = fit_clusters_auto(method, factored, weights, rank, float(target_error),
                                                  max_iters=max_iters, tol=tol, seed=seed * 1_000_003 + index,
                                                  slot=slot)
            else:
                result = fit_clusters(method, factored, weights, rank, clusters, max_iters=max_iters, tol=tol,
                                      generator=generator)
            slot_weights[slot], errors[slot] = _slot_weights(method, factored, result, rank)
            slot_log[slot] = {"clusters": len(result.fits), "rounds": result.rounds,
                             "sweeps": [fit.sweeps for fit in result.fits],
                             "loss": [fit.loss for fit in result.fits]}
            if tried is not None:
                slot_log[slot]["auto_mean_error"] = {str(k): v for k, v in tried.items()}
        del factored
    fit_log = {"settings": {"weighting": weighting, "max_iters": max_iters, "tol": tol, "seed": seed,
                            "clusters": clusters, "target_error": target_error}, "slots": slot_log}
    return AdapterBank(method=method, rank=rank, adapter_names=collection.names, slot_weights=slot_weights,
                       errors=errors, base_model=collection.base_model, target_modules=collection.target_modules,
                       task_type=collection.task_type, fit_log=fit_log)
