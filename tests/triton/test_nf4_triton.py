"""Triton nf4 kernels vs the PyTorch reference: dequantize bit for bit, the linear layer (split-K
GEMV and tiled GEMM launches, LoRA / DoRA epilogue) within the docs/design.md §3 tolerance of an fp64 oracle.

Runs on a CUDA GPU, or on CPU under the Triton interpreter (``TRITON_INTERPRET=1`` set before
Python starts). The interpreter is slow: shapes are small and the cases a curated list.
"""
from __future__ import annotations

import os

import pytest
import torch

if not (os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()):
    pytest.skip("Triton kernels need a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)

import lolakernels  # noqa: E402
from lolakernels.ops.nf4 import read_nf4  # noqa: E402
from lolakernels.reference import nf4 as reference  # noqa: E402
from lolakernels.triton import nf4 as triton_nf4  # noqa: E402
from nf4_cases import assert_within_plain_torch_error, quantize  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter computes bf16 wrongly, so bf16 is only checked on a real GPU.
DTYPES = (torch.float32, torch.float16) + ((torch.bfloat16,) if torch.cuda.is_available() else ())
SCALE = 0.75


def _weight(n, k, blocksize, nested, seed=0):
    """(Nf4Weight, packed, quant_state) quantized by bitsandbytes (on the CPU), moved to DEVICE."""
    generator = torch.Generator().manual_seed(seed)
    packed, state = quantize(torch.randn(n, k, generator=generator), blocksize, nested)
    if DEVICE != "cpu":
        packed, state = packed.to(DEVICE), state.to(DEVICE)
    return read_nf4(packed, state), packed, state


# (n, k, blocksize, nested): blocks inside rows, blocks straddling rows, odd K (rows start mid-byte),
# numel not a multiple of the blocksize, one block larger than the whole weight.
DEQUANTIZE_CASES = [
    (16, 64, 64, True), (24, 96, 32, False), (7, 33, 64, True), (5, 97, 128, False),
    (9, 70, 256, True), (3, 100, 512, False), (2, 999, 1024, True), (3, 1000, 2048, False), (3, 1001, 4096, True),
]


def test_double_quantization_offset_stays_a_device_pointer():
    """The offset is handed to the kernels as a tensor, never read on the host: a host read of a
    CUDA tensor synchronizes the stream and cannot be captured in a CUDA graph."""
    nf4, _, _ = _weight(16, 64, 64, nested=True)
    offset_argument = triton_nf4._storage_args(nf4)[4]
    assert isinstance(offset_argument, torch.Tensor) and offset_argument is nf4.absmax_offset


@pytest.mark.parametrize("n,k,blocksize,nested", DEQUANTIZE_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantize_bit_exact(n, k, blocksize, nested, dtype):
    nf4, _, _ = _weight(n, k, blocksize, nested)
    expected = reference.nf4_dequantize(nf4, dtype)
    assert torch.equal(triton_nf4.nf4_dequantize(nf4, dtype), expected)
    # Ranges starting at odd flat indices (rows of odd K) and crossing blocks.
    begin, count = 3, n * k - 7
    assert torch.equal(triton_nf4.dequantize_range(nf4, begin, count, dtype), expected.reshape(-1)[begin:begin + count])
    assert torch.equal(triton_nf4.dequantize_rows(nf4, 1, n - 1, dtype), expected[1:])


def test_dequantize_matches_bitsandbytes_through_public_api(use_backend):
    use_backend("triton")
    nf4, packed, state = _weight(12, 64, 64, True)
    for dtype in DTYPES:
        assert torch.equal(lolakernels.nf4_dequantize(packed, state, out_dtype=dtype),
                           reference.nf4_dequantize(nf4, dtype))


def _oracle(x, nf4, compute_dtype, lora_a, lora_b, scale, bias, magnitude, weight_norm):
    """fp64 evaluation of the layer on the same dequantized (compute-dtype) weight."""
    w = reference.nf4_dequantize(nf4, compute_dtype).double()
    y = x.to(compute_dtype).double() @ w.t()
    if bias is not None:
        y = y + bias.to(compute_dtype).double()
    if lora_a is None:
        return y
    t = (x.double() @ lora_a.double().t()) @ lora_b.double().t()
    if magnitude is None:
        return y + scale * t
    s = magnitude.double() / weight_norm.double()
    base = y if bias is None else y - bias.to(compute_dtype).double()
    return y + (s - 1) * base + s * t * scale


def _problem(m, n, k, blocksize, nested, dtype, *, lora=True, with_bias=True, dora=False, seed=0):
    nf4, _, _ = _weight(n, k, blocksize, nested, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=generator).to(dtype).to(DEVICE)
    lora_a = lora_b = bias = magnitude = weight_norm = None
    if lora:
        lora_a = (torch.randn(4, k, generator=generator) / k ** 0.5).to(DEVICE)
        lora_b = (torch.randn(n, 4, generator=generator) / 2).to(DEVICE)
    if with_bias:
        bias = torch.randn(n, generator=generator).to(dtype).to(DEVICE)
    if dora:
        magnitude = (torch.rand(n, generator=generator) * 8 + 1).to(DEVICE)
        weight_norm = reference.dora_weight_norm(nf4, lora_a, lora_b, SCALE)
    return nf4, (x, nf4, dtype, None, lora_a, lora_b, SCALE, bias, magnitude, weight_norm)


def _check(args, **launch):
    x, nf4, compute_dtype, _, lora_a, lora_b, scale, bias, magnitude, weight_norm = args
    ours = triton_nf4.nf4_lora_linear(*args, **launch)
    plain = reference.nf4_lora_linear(*args)
    oracle = _oracle(x, nf4, compute_dtype, lora_a, lora_b, scale, bias, magnitude, weight_norm)
    assert_within_plain_torch_error(ours, plain, oracle)


# (m, n, k, blocksize, nested): M = 1 / 5 take the split-K GEMV, 33 the tiled GEMM; odd K and
# blocks straddling rows on both.
LINEAR_CASES = [
    (1, 24, 64, 64, True), (1, 7, 33, 32, False), (5, 40, 96, 32, True), (5, 9, 97, 128, False),
    (33, 24, 64, 64, False), (33, 19, 75, 64, True), (1, 5, 300, 4096, True),
]


@pytest.mark.parametrize("m,n,k,blocksize,nested", LINEAR_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lora_linear(m, n, k, blocksize, nested, dtype):
    _, args = _problem(m, n, k, blocksize, nested, dtype)
    _check(args)


@pytest.mark.parametrize("lora,with_bias", [(False, False), (False, True), (True, False)], ids=["plain", "bias", "lora"])
@pytest.mark.parametrize("m", [1, 33])
def test_without_bias_or_adapter(lora, with_bias, m):
    _, args = _problem(m, 12, 48, 32, True, torch.float16, lora=lora, with_bias=with_bias)
    _check(args)


@pytest.mark.parametrize("m,k", [(1, 64), (5, 33), (33, 64)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dora(m, k, dtype):
    _, args = _problem(m, 10, k, 32, True, dtype, dora=True)
    _check(args)


@pytest.mark.parametrize("m", [1, 33], ids=["gemv", "gemm"])
def test_rank_zero_dora(m):
    """An empty adapter still leaves DoRA's magnitude / ‖W‖ rescaling of the base."""
    nf4, args = _problem(m, 10, 64, 32, True, torch.float32, dora=True)
    x, nf4, dtype, x_lora, _, _, scale, bias, magnitude, _ = args
    lora_a, lora_b = torch.zeros(0, 64, device=DEVICE), torch.zeros(10, 0, device=DEVICE)
    weight_norm = reference.dora_weight_norm(nf4, lora_a, lora_b, scale)
    _check((x, nf4, dtype, x_lora, lora_a, lora_b, scale, bias, magnitude, weight_norm))


@pytest.mark.parametrize("k", [96, 97])
def test_split_k_with_many_splits_and_gemm_with_small_tiles(k):
    """Split-K across several chunks (partials summed in the second kernel), and the tiled GEMM
    forced on few tokens / several K steps, agree with the oracle."""
    _, args = _problem(3, 20, k, 32, False, torch.float32)
    _check(args, gemv=True, block_n=16, block_k=32)
    _check(args, gemv=False, block_m=16, block_n=16, block_k=32)


def test_compute_dtype_differs_from_input_dtype():
    _, args = _problem(5, 12, 64, 64, True, torch.float32, dora=True)
    x, nf4, _, *rest = args
    _check((x, nf4, torch.float16, *rest))


@pytest.mark.parametrize("m", [0, 1, 5, 33])
def test_public_api_selects_triton(use_backend, m):
    use_backend("triton")
    nf4, packed, state = _weight(16, 64, 64, True)
    _, args = _problem(m, 16, 64, 64, True, torch.float32)
    x, _, _, _, lora_a, lora_b, scale, bias, _, _ = args
    y = lolakernels.nf4_lora_linear(x.reshape(m, 1, 64), packed, state, lora_a, lora_b, scale, bias=bias)
    assert y.shape == (m, 1, 16)
    assert_within_plain_torch_error(y.reshape(m, 16), reference.nf4_lora_linear(*args),
                                    _oracle(x, nf4, torch.float32, lora_a, lora_b, scale, bias, None, None))
