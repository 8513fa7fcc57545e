"""randomized_svd and awsvd against exact SVDs (torch.linalg, fp64) and the full-SVD reference."""
from __future__ import annotations

import importlib

import pytest
import torch

from lolakernels.compress.weighted_svd import awsvd, choose_method, cholesky_qr, lower_gram, randomized_svd
from lolakernels.reference.awsvd import (
    awsvd_exact,
    optimal_weighted_error,
    weighted_error,
)

awsvd_module = importlib.import_module("lolakernels.compress.weighted_svd")

METHODS = ("randomized", "gram", "exact", "auto")
# (d_out, d_in, rank): odd sizes, tall and wide, rank 1 and rank = min(d_out, d_in).
SHAPES = ((37, 53, 5), (64, 29, 12), (96, 96, 1), (40, 24, 24), (130, 150, 12))


def decaying_matrix(*shape, alpha=1.0, seed=0, dtype=torch.float32):
    """Random singular vectors, singular values i^-alpha (a spectrum like a trained weight's)."""
    generator = torch.Generator().manual_seed(seed)
    *batch, m, n = shape
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(*batch, m, k, generator=generator, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(*batch, n, k, generator=generator, dtype=torch.float64)).Q
    s = torch.arange(1, k + 1, dtype=torch.float64) ** -alpha
    return ((u * s) @ v.mT).to(dtype)


def activation_scale(*shape, seed=1):
    """Positive per-channel scales with a few large outlier channels, as LLM activations have."""
    generator = torch.Generator().manual_seed(seed)
    scale = torch.exp(0.5 * torch.randn(*shape, generator=generator))
    scale[..., :: max(1, shape[-1] // 7)] *= 10
    return scale


# ----------------------------------------------------------------------------------------------
# randomized_svd
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,rank", [((50, 37), 6), ((37, 50), 6), ((3, 41, 30), 4), ((2, 2, 20, 33), 7),
                                        ((30, 30), 30), ((64, 64), 1)])
def test_randomized_svd_matches_exact_svd(shape, rank):
    matrix = decaying_matrix(*shape, alpha=1.5)
    u, s, vh = randomized_svd(matrix, rank)
    *batch, m, n = shape
    assert u.shape == (*batch, m, rank) and s.shape == (*batch, rank) and vh.shape == (*batch, rank, n)
    exact = torch.linalg.svdvals(matrix.double())
    torch.testing.assert_close(s.double(), exact[..., :rank], rtol=1e-4, atol=1e-6)
    eye = torch.eye(rank, dtype=u.dtype).expand(*batch, rank, rank)
    torch.testing.assert_close(u.mT @ u, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(vh @ vh.mT, eye, atol=1e-5, rtol=0)
    error = torch.linalg.matrix_norm(matrix.double() - (u * s.unsqueeze(-2)).double() @ vh.double())
    optimal = exact[..., rank:].norm(dim=-1)
    assert bool((error <= optimal * 1.001 + 1e-6).all()), (error, optimal)


def test_randomized_svd_flat_spectrum_is_near_optimal():
    generator = torch.Generator().manual_seed(3)
    matrix = torch.randn(120, 90, generator=generator)
    u, s, vh = randomized_svd(matrix, 20)
    optimal = torch.linalg.svdvals(matrix.double())[20:].norm()
    error = torch.linalg.matrix_norm(matrix.double() - ((u * s) @ vh).double())
    assert error <= 1.01 * optimal


@pytest.mark.parametrize("dtype,expected", [(torch.float32, torch.float32), (torch.float64, torch.float64),
                                            (torch.float16, torch.float32), (torch.bfloat16, torch.float32)])
def test_randomized_svd_dtypes(dtype, expected):
    matrix = decaying_matrix(45, 31, alpha=1.0).to(dtype)
    u, s, vh = randomized_svd(matrix, 5)
    assert u.dtype == s.dtype == vh.dtype == expected
    exact = torch.linalg.svdvals(matrix.double())[:5]
    torch.testing.assert_close(s.double(), exact, rtol=1e-4 if dtype != torch.float32 else 1e-5, atol=1e-6)


def test_randomized_svd_is_deterministic_and_leaves_global_rng_alone():
    matrix = torch.randn(60, 40, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = randomized_svd(matrix, 4, niter=0, oversample=0, seed=7)
    second = randomized_svd(matrix, 4, niter=0, oversample=0, seed=7)
    assert torch.equal(torch.rand(3), expected_next)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    # Without power iterations or oversampling the sketch depends visibly on the seed.
    other = randomized_svd(matrix, 4, niter=0, oversample=0, seed=8)
    assert not torch.equal(first[1], other[1])


def test_randomized_svd_power_iterations_improve_a_flat_spectrum():
    matrix = torch.randn(120, 120, generator=torch.Generator().manual_seed(0))
    optimal = torch.linalg.svdvals(matrix.double())[10:].norm()

    def error(niter):
        u, s, vh = randomized_svd(matrix, 10, niter=niter, oversample=2)
        return torch.linalg.matrix_norm(matrix.double() - ((u * s) @ vh).double()) / optimal

    assert error(4) < error(0)


@pytest.mark.parametrize("kwargs,exception,needle", [
    (dict(matrix=torch.ones(5)), ValueError, "matrix"),
    (dict(matrix=[[1.0]]), TypeError, "matrix"),
    (dict(matrix=torch.ones(4, 4, dtype=torch.int64)), TypeError, "matrix"),
    (dict(rank=0), ValueError, "rank"),
    (dict(rank=7), ValueError, "rank"),
    (dict(rank=2.0), TypeError, "rank"),
    (dict(oversample=-1), ValueError, "oversample"),
    (dict(niter=-2), ValueError, "niter"),
    (dict(seed=-1), ValueError, "seed"),
])
def test_randomized_svd_rejects_bad_arguments(kwargs, exception, needle):
    arguments = dict(matrix=torch.ones(6, 8), rank=2)
    arguments.update(kwargs)
    matrix, rank = arguments.pop("matrix"), arguments.pop("rank")
    with pytest.raises(exception, match=needle):
        randomized_svd(matrix, rank, **arguments)


# ----------------------------------------------------------------------------------------------
# reference (full SVD)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("d_out,d_in,rank", SHAPES)
def test_reference_reaches_the_eckart_young_optimum(d_out, d_in, rank):
    weight = decaying_matrix(d_out, d_in, alpha=0.7, dtype=torch.float64)
    scale = activation_scale(d_in).double()
    left, right = awsvd_exact(weight, scale, rank)
    assert left.shape == (d_out, rank) and right.shape == (rank, d_in)
    optimal = optimal_weighted_error(weight, scale, rank)
    torch.testing.assert_close(weighted_error(weight, scale, left, right), optimal, rtol=1e-9, atol=1e-12)
    # Independent form of the optimum: the weighted projection W diag(d) V_k V_kᵀ diag(d)⁻¹.
    _, _, vh = torch.linalg.svd(weight * scale, full_matrices=False)
    v = vh[:rank].mT
    projected = ((weight * scale) @ v @ v.mT) / scale
    torch.testing.assert_close(left @ right, projected, rtol=1e-8, atol=1e-10)


def test_reference_balances_the_factors():
    weight = decaying_matrix(30, 20, dtype=torch.float64)
    scale = activation_scale(20).double()
    left, right = awsvd_exact(weight, scale, 6)
    # ‖L_i‖ = σ_i^{1/2} and ‖(R diag(d))_i‖ = σ_i^{1/2}: L Lᵀ-side and R-side carry equal weight.
    torch.testing.assert_close(left.norm(dim=0), (right * scale).norm(dim=1), rtol=1e-10, atol=0)


# ----------------------------------------------------------------------------------------------
# awsvd
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("d_out,d_in,rank", SHAPES)
def test_awsvd_is_near_optimal(method, d_out, d_in, rank):
    weight = decaying_matrix(d_out, d_in, alpha=0.8)
    scale = activation_scale(d_in)
    left, right = awsvd(weight, scale, rank, method=method)
    assert left.shape == (d_out, rank) and right.shape == (rank, d_in)
    assert left.dtype == right.dtype == torch.float32
    error = weighted_error(weight, scale, left, right)
    ref_left, ref_right = awsvd_exact(weight, scale, rank)
    if rank == min(d_out, d_in):  # nothing is truncated: the optimum is 0 and W comes back
        # The Gram route squares the condition number in float32, hence the looser bound.
        torch.testing.assert_close(left @ right, weight, atol=1e-4, rtol=0)
        assert error <= 1e-4 * torch.linalg.matrix_norm((weight * scale).double())
    else:
        ratio = error / optimal_weighted_error(weight, scale, rank)
        assert ratio <= 1.01, ratio
    assert torch.linalg.matrix_norm(left @ right - ref_left @ ref_right) <= 0.2 * weight.norm()


@pytest.mark.parametrize("method", ("randomized", "gram", "exact"))
def test_awsvd_flat_spectrum_within_one_percent(method):
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(160, 224, generator=generator)
    scale = activation_scale(224)
    left, right = awsvd(weight, scale, 24, method=method)
    ratio = weighted_error(weight, scale, left, right) / optimal_weighted_error(weight, scale, 24)
    assert ratio <= 1.01, ratio


@pytest.mark.parametrize("method", ("randomized", "gram", "exact"))
@pytest.mark.parametrize("per_matrix_scale", (False, True))
def test_awsvd_batch_equals_each_matrix(method, per_matrix_scale):
    weight = decaying_matrix(3, 41, 27, alpha=1.0)
    scale = activation_scale(3, 27) if per_matrix_scale else activation_scale(27)
    left, right = awsvd(weight, scale, 6, method=method)
    assert left.shape == (3, 41, 6) and right.shape == (3, 6, 27)
    for index in range(3):
        one_scale = scale[index] if per_matrix_scale else scale
        one_left, one_right = awsvd(weight[index], one_scale, 6, method=method)
        torch.testing.assert_close(left[index] @ right[index], one_left @ one_right, atol=1e-4, rtol=1e-4)
    ratio = weighted_error(weight, scale, left, right) / optimal_weighted_error(weight, scale, 6)
    assert bool((ratio <= 1.01).all()), ratio


@pytest.mark.parametrize("method", ("randomized", "gram", "exact"))
@pytest.mark.parametrize("dtype,ratio_bound", [(torch.float64, 1 + 1e-9), (torch.float16, 1.01),
                                               (torch.bfloat16, 1.02)])
def test_awsvd_dtypes(method, dtype, ratio_bound):
    weight = decaying_matrix(48, 40, alpha=0.8).to(dtype)
    scale = activation_scale(40).to(dtype)
    left, right = awsvd(weight, scale, 8, method=method, tolerance=1e-9 if dtype == torch.float64 else 1e-2)
    assert left.dtype == right.dtype == dtype
    # Judged on the weight as given; the factors' own rounding to 16 bits is part of the error.
    ratio = weighted_error(weight, scale, left, right) / optimal_weighted_error(weight, scale, 8)
    assert ratio <= ratio_bound, ratio


def test_awsvd_weighting_beats_plain_svd_on_the_weighted_error():
    weight = decaying_matrix(64, 64, alpha=0.5)
    scale = activation_scale(64)
    left, right = awsvd(weight, scale, 8)
    u, s, vh = torch.linalg.svd(weight)
    plain = (u[:, :8] * s[:8]) @ vh[:8]
    weighted = weighted_error(weight, scale, left, right)
    plain_error = torch.linalg.matrix_norm(((weight - plain) * scale).double())
    assert weighted < 0.9 * plain_error


def test_awsvd_uniform_scale_is_plain_truncated_svd():
    weight = decaying_matrix(50, 30, alpha=1.0)
    left, right = awsvd(weight, torch.full((30,), 3.0), 4, method="exact")
    u, s, vh = torch.linalg.svd(weight.double())
    torch.testing.assert_close((left @ right).double(), (u[:, :4] * s[:4]) @ vh[:4], atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ("randomized", "gram", "exact"))
def test_awsvd_rank_deficient_and_zero_weights(method):
    generator = torch.Generator().manual_seed(0)
    low_rank = torch.randn(40, 3, generator=generator) @ torch.randn(3, 30, generator=generator)
    scale = activation_scale(30)
    left, right = awsvd(low_rank, scale, 6, method=method)
    assert torch.isfinite(left).all() and torch.isfinite(right).all()
    torch.testing.assert_close(left @ right, low_rank, atol=1e-4, rtol=1e-4)
    left, right = awsvd(torch.zeros(20, 10), torch.ones(10), 3, method=method)
    assert torch.equal(left @ right, torch.zeros(20, 10))


def test_awsvd_tiny_scales_do_not_blow_up_dead_channels():
    weight = decaying_matrix(40, 32, alpha=0.5)
    scale = activation_scale(32)
    scale[5] = 1e-12  # a channel whose activations are always ~0
    for method in ("randomized", "gram", "exact"):
        left, right = awsvd(weight, scale, 8, method=method)
        # Direction kept or dropped, the column is never amplified beyond the weight's scale.
        assert (left @ right)[:, 5].abs().max() <= 2 * weight.abs().max(), method


def test_awsvd_explicit_iterations_and_seed():
    weight = torch.randn(90, 70, generator=torch.Generator().manual_seed(2))
    scale = activation_scale(70)
    optimal = optimal_weighted_error(weight, scale, 10)
    few = weighted_error(weight, scale, *awsvd(weight, scale, 10, method="randomized", niter=0, oversample=0))
    many = weighted_error(weight, scale, *awsvd(weight, scale, 10, method="randomized", niter=8, oversample=5))
    assert many < few and many <= 1.01 * optimal
    first = awsvd(weight, scale, 10, method="randomized", seed=3)
    second = awsvd(weight, scale, 10, method="randomized", seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("shape", ((700, 517), (2, 300, 600), (90, 40)))
def test_lower_gram_is_the_lower_triangle_of_the_gram(shape):
    tall = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    gram = lower_gram(tall)
    torch.testing.assert_close(gram.tril(), (tall.mT @ tall).tril(), rtol=1e-12, atol=1e-9)
    if shape[-1] >= awsvd_module.SYMMETRIC_PRODUCT_MIN_WIDTH:
        assert bool((gram[..., 0, -1] == 0).all())  # a block above the diagonal: never multiplied


def test_cholesky_qr_on_a_blocked_gram():
    generator = torch.Generator().manual_seed(4)
    tall = torch.randn(900, 600, generator=generator) * torch.logspace(0, 3, 600)  # cond ≈ 10³
    basis = cholesky_qr(tall)
    torch.testing.assert_close(basis.mT @ basis, torch.eye(600), atol=1e-4, rtol=0)
    torch.testing.assert_close(basis @ (basis.mT @ tall), tall, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("d_out,d_in", ((160, 224), (224, 160)))
@pytest.mark.parametrize("spectrum", ("flat", "steep"))
def test_gram_route_refines_only_when_the_float32_gram_is_too_coarse(monkeypatch, d_out, d_in, spectrum):
    refinements = []
    original = awsvd_module._subspace_iteration
    monkeypatch.setattr(awsvd_module, "_subspace_iteration",
                        lambda *args, **kwargs: refinements.append(1) or original(*args, **kwargs))
    if spectrum == "flat":
        weight = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(6))
    else:  # σ_24 / σ_1 = 24⁻²: σ_k² sits ~10⁻⁶ below σ_1², at float32's rounding of the Gram
        weight = decaying_matrix(d_out, d_in, alpha=2.0)
    scale = activation_scale(d_in)
    left, right = awsvd(weight, scale, 24, method="gram")
    assert len(refinements) == (spectrum == "steep")
    ratio = weighted_error(weight, scale, left, right) / optimal_weighted_error(weight, scale, 24)
    assert ratio <= 1.001, ratio


def test_choose_method():
    assert choose_method(200, 4096, 16) == "exact"
    assert choose_method(4096, 4096, 256) == "randomized"
    assert choose_method(4096, 11008, 1024) == "randomized"
    assert choose_method(4096, 4096, 2048) == "gram"
    assert choose_method(576, 576, 36) == "randomized"
    assert choose_method(576, 576, 138) == "gram"


def test_auto_dispatches_to_the_chosen_method(monkeypatch):
    calls = []
    for name in ("_awsvd_exact", "_awsvd_gram", "_awsvd_randomized"):
        original = getattr(awsvd_module, name)
        def spy(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(awsvd_module, name, spy)
    weight, scale = torch.randn(300, 280), activation_scale(280)
    awsvd(weight, scale, 20)
    awsvd(weight, scale, 100)
    awsvd(weight[:100], scale, 20)
    assert calls == ["_awsvd_randomized", "_awsvd_gram", "_awsvd_exact"]


@pytest.mark.parametrize("change,exception,needle", [
    (dict(weight=torch.ones(4)), ValueError, "weight"),
    (dict(weight=torch.ones(2, 2, 4, 6)), ValueError, "weight"),
    (dict(weight=torch.ones(4, 6, dtype=torch.int32)), TypeError, "weight"),
    (dict(act_scale=[1.0] * 6), TypeError, "act_scale"),
    (dict(act_scale=torch.ones(5)), ValueError, "act_scale"),
    (dict(act_scale=torch.ones(6, dtype=torch.int64)), TypeError, "act_scale"),
    (dict(act_scale=torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 1.0])), ValueError, "positive"),
    (dict(act_scale=torch.tensor([1.0, -2.0, 1.0, 1.0, 1.0, 1.0])), ValueError, "positive"),
    (dict(act_scale=torch.tensor([1.0, 1.0, float("nan"), 1.0, 1.0, 1.0])), ValueError, "finite"),
    (dict(act_scale=torch.tensor([1.0, 1.0, 1.0, float("inf"), 1.0, 1.0])), ValueError, "finite"),
    (dict(rank=0), ValueError, "rank"),
    (dict(rank=5), ValueError, "rank"),
    (dict(rank=True), TypeError, "rank"),
    (dict(method="svd"), ValueError, "method"),
    (dict(oversample=-3), ValueError, "oversample"),
    (dict(niter=-1), ValueError, "niter"),
])
def test_awsvd_rejects_bad_arguments(change, exception, needle):
    arguments = dict(weight=torch.ones(4, 6), act_scale=torch.ones(6), rank=2)
    arguments.update(change)
    with pytest.raises(exception, match=needle):
        awsvd(arguments.pop("weight"), arguments.pop("act_scale"), arguments.pop("rank"), **arguments)


def test_awsvd_batched_scale_shape_is_checked():
    with pytest.raises(ValueError, match="act_scale"):
        awsvd(torch.ones(3, 4, 6), torch.ones(2, 6), 2)


def test_package_exports():
    import lolakernels
    import lolakernels.compress

    assert lolakernels.awsvd is awsvd
    weight, scale = torch.randn(9, 7), activation_scale(7)
    left, right = lolakernels.compress.awsvd(weight, scale, 3)
    assert torch.equal(left @ right, awsvd(weight, scale, 3)[0] @ awsvd(weight, scale, 3)[1])
