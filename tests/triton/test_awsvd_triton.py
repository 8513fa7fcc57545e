"""Triton scaled GEMM of the randomized AWSVD route vs float64 torch products, and awsvd run
through it end to end.

Runs on a CUDA GPU, or on CPU under the Triton interpreter (``TRITON_INTERPRET=1`` must be set
before Python starts). Shapes are small: the interpreter is slow.
"""
from __future__ import annotations

import importlib
import os

import pytest
import torch

if not (os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()):
    pytest.skip("Triton kernels need a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)

from lolakernels.compress.weighted_svd import awsvd  # noqa: E402
from lolakernels.reference.awsvd import optimal_weighted_error, weighted_error  # noqa: E402
from lolakernels.triton import awsvd as triton_awsvd  # noqa: E402
from lolakernels.triton.awsvd import scaled_matmul  # noqa: E402

awsvd_module = importlib.import_module("lolakernels.compress.weighted_svd")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter computes bf16 wrongly, so bf16 is only checked on a real GPU.
DTYPES = (torch.float32, torch.float16) + ((torch.bfloat16,) if torch.cuda.is_available() else ())
SHAPES = ((37, 53, 5), (64, 29, 17), (1, 40, 3), (70, 1, 2))  # (M, K, N)


def _data(*shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)


def _expected(a, x, scale):
    a64, x64 = a.double(), x.double()
    if scale is not None:
        x64 = x64 * scale.double().unsqueeze(-1)
    return a64 @ x64


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("with_scale", (False, True))
@pytest.mark.parametrize("transposed", (False, True))
def test_scaled_matmul_matches_float64(dtype, m, k, n, with_scale, transposed):
    a = _data(k, m, seed=1, dtype=dtype).mT if transposed else _data(m, k, seed=1, dtype=dtype)
    x = _data(k, n, seed=2)
    scale = _data(k, seed=3).abs() + 0.1 if with_scale else None
    got = scaled_matmul(a, x, scale)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    expected = _expected(a, x, scale)
    # 16-bit a is exact in fp32 products; x keeps ~fp32 accuracy through the hi/lo split.
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * (1 + expected.abs().max().item()))


@pytest.mark.parametrize("shared_scale", (False, True))
def test_scaled_matmul_batched(shared_scale):
    a = _data(3, 33, 21, seed=4)
    x = _data(3, 21, 9, seed=5)
    scale = (_data(21, seed=6) if shared_scale else _data(3, 21, seed=6)).abs() + 0.1
    got = scaled_matmul(a, x, scale)
    expected = _expected(a, x, scale if not shared_scale else scale.expand(3, 21))
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_scaled_matmul_rejects_bad_input():
    with pytest.raises(TypeError, match="x"):
        scaled_matmul(_data(4, 5, seed=0), _data(5, 2, seed=0, dtype=torch.float16))
    with pytest.raises(ValueError, match="x"):
        scaled_matmul(_data(4, 5, seed=0), _data(6, 2, seed=0))
    with pytest.raises(ValueError, match="scale"):
        scaled_matmul(_data(4, 5, seed=0), _data(5, 2, seed=0), _data(4, seed=0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batched", (False, True))
def test_awsvd_randomized_through_triton(monkeypatch, dtype, batched):
    monkeypatch.setenv("LOLA_BACKEND", "triton")
    calls = []
    original = triton_awsvd.scaled_matmul
    monkeypatch.setattr(triton_awsvd, "scaled_matmul", lambda *args: calls.append(1) or original(*args))
    generator = torch.Generator().manual_seed(7)
    shape = (2, 48, 40) if batched else (48, 40)
    u = torch.linalg.qr(torch.randn(*shape[:-1], 40, generator=generator)).Q
    singular_values = torch.arange(1, 41, dtype=torch.float32) ** -0.8
    v = torch.linalg.qr(torch.randn(*shape[:-2], 40, 40, generator=generator)).Q
    weight = ((u * singular_values) @ v.mT).to(dtype).to(DEVICE)
    scale = (torch.rand(40, generator=generator) + 0.2).to(DEVICE)
    left, right = awsvd(weight, scale, 6, method="randomized")
    assert calls, "the Triton products were not used"
    assert left.dtype == right.dtype == dtype
    ratio = weighted_error(weight.cpu(), scale.cpu(), left.cpu(), right.cpu()) / optimal_weighted_error(
        weight.cpu(), scale.cpu(), 6)
    assert bool((ratio <= 1.02 if dtype != torch.float32 else ratio <= 1.01).all()), ratio
    monkeypatch.delenv("LOLA_BACKEND")
    torch_left, torch_right = awsvd(weight, scale, 6, method="randomized")
    torch.testing.assert_close((left.float() @ right.float()), (torch_left.float() @ torch_right.float()),
                               atol=2e-2 if dtype != torch.float32 else 1e-4, rtol=0)
