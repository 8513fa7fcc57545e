"""The nf4 kernels on a GPU: the CUDA decode GEMV and the Triton kernels through the public API
against the reference (dequantize bit for bit; the layer within the docs/design.md §3 tolerance of an fp64
oracle). Skipped with a reason where no CUDA GPU is visible (see conftest.py)."""
import pytest
import torch

import lolakernels
from lolakernels import _backends
from lolakernels.ops.nf4 import read_nf4
from lolakernels.reference import nf4 as reference
from nf4_cases import assert_within_plain_torch_error, quantize

pytestmark = pytest.mark.gpu

# (n, k, blocksize, nested): the 128-bit path (K % 32 == 0), odd K (generic path), blocks
# straddling rows, the largest blocksize, and a decode-sized layer.
GPU_NF4_SHAPES = [(64, 256, 64, True), (37, 97, 64, False), (48, 160, 128, True), (16, 4096, 4096, False),
                  (4096, 4096, 64, True)]
SCALE = 0.5


def _problem(m, n, k, blocksize, nested, dtype, dora=False):
    generator = torch.Generator().manual_seed(n + k + m)
    packed, state = quantize(torch.randn(n, k, generator=generator).cuda(), blocksize, nested)
    x = torch.randn(m, k, generator=generator).to(dtype).cuda()
    lora_a = (torch.randn(16, k, generator=generator) / k ** 0.5).cuda()
    lora_b = (torch.randn(n, 16, generator=generator) / 4).cuda()
    bias = torch.randn(n, generator=generator).to(dtype).cuda()
    magnitude = (torch.rand(n, generator=generator) * 8 + 1).cuda() if dora else None
    return packed, state, x, lora_a, lora_b, bias, magnitude


def _oracle(x, nf4, lora_a, lora_b, bias, magnitude, weight_norm):
    w = reference.nf4_dequantize(nf4, x.dtype).double()
    y = x.double() @ w.t() + bias.double()
    t = (x.double() @ lora_a.double().t()) @ lora_b.double().t()
    if magnitude is None:
        return y + SCALE * t
    s = magnitude.double() / weight_norm.double()
    return y + (s - 1) * (y - bias.double()) + s * t * SCALE


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", GPU_NF4_SHAPES, ids=lambda s: "n{}_k{}_bs{}_nested{}".format(*s))
@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_nf4_linear_decode_matches_reference(use_backend, backend, dtype, shape, m, dora):
    packed, state, x, lora_a, lora_b, bias, magnitude = _problem(m, *shape, dtype, dora)
    nf4 = read_nf4(packed, state)
    case = _backends.Case(x.device, dtype, m, op="nf4_lora_linear", out_dtype=dtype, lora_dtype=torch.float32)
    assert _backends.select(case) == "cuda", _backends._decline_reason("cuda", case)
    use_backend(backend)
    y = lolakernels.nf4_lora_linear(x, packed, state, lora_a, lora_b, SCALE, bias=bias, magnitude=magnitude)
    weight_norm = reference.dora_weight_norm(nf4, lora_a, lora_b, SCALE) if dora else None
    plain = reference.nf4_lora_linear(x, nf4, dtype, None, lora_a, lora_b, SCALE, bias, magnitude, weight_norm)
    assert_within_plain_torch_error(y, plain, _oracle(x, nf4, lora_a, lora_b, bias, magnitude, weight_norm))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_gemv_without_bias_or_adapter(dtype):
    from lolakernels import cuda

    packed, state, x, *_ = _problem(3, 40, 128, 64, True, dtype)
    nf4 = read_nf4(packed, state)
    y = cuda.nf4_lora_linear(x, nf4, dtype, None, None, None, 0.0, None, None, None)
    plain = reference.nf4_lora_linear(x, nf4, dtype, None, None, None, 0.0, None, None, None)
    oracle = x.double() @ reference.nf4_dequantize(nf4, dtype).double().t()
    assert_within_plain_torch_error(y, plain, oracle)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", GPU_NF4_SHAPES[:4], ids=lambda s: "n{}_k{}_bs{}_nested{}".format(*s))
def test_triton_dequantize_bit_exact_on_gpu(use_backend, dtype, shape):
    use_backend("triton")
    packed, state, *_ = _problem(1, *shape, torch.float16)
    expected = reference.nf4_dequantize(read_nf4(packed, state), dtype)
    assert torch.equal(lolakernels.nf4_dequantize(packed, state, out_dtype=dtype), expected)


def test_large_batch_goes_to_triton():
    case = _backends.Case(torch.device("cuda"), torch.float16, 64, op="nf4_lora_linear", out_dtype=torch.float16,
                          lora_dtype=torch.float32)
    assert _backends.select(case) == "triton"


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_nf4_linear_decode_captures_in_a_cuda_graph(use_backend, backend):
    """Serving engines replay decode steps as CUDA graphs: the call must not read anything on the
    host (the double-quantization offset is passed as a device pointer) and a replay with new
    inputs must give the eager result."""
    packed, state, x, lora_a, lora_b, bias, _ = _problem(4, 4096, 4096, 64, True, torch.bfloat16)
    use_backend(backend)
    static_x = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (Triton compiles) outside the capture
        lolakernels.nf4_lora_linear(static_x, packed, state, lora_a, lora_b, SCALE, bias=bias)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = lolakernels.nf4_lora_linear(static_x, packed, state, lora_a, lora_b, SCALE, bias=bias)
    fresh_x = torch.randn_like(x)
    static_x.copy_(fresh_x)
    graph.replay()
    eager = lolakernels.nf4_lora_linear(fresh_x, packed, state, lora_a, lora_b, SCALE, bias=bias)
    torch.testing.assert_close(static_y, eager, rtol=0, atol=0)
