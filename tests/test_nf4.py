"""nf4 ops: bit-exact dequantization against bitsandbytes, the fused linear against the reference
on every CPU path, and the refusals (fp4, the CPU-repacked layout, bad arguments)."""
import gc
import re

import pytest
import torch

import lolakernels
from conftest import CPU_BACKENDS
from lolakernels.ops.nf4 import read_nf4
from lolakernels.reference import nf4 as reference
from nf4_cases import bnb_cpu_kernel_reads_exactly, bnb_generic_dequantize, quantize

bnbf = pytest.importorskip("bitsandbytes.functional")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# (N, K): aligned rows, K % blocksize != 0, odd K, numel not a multiple of any blocksize, tiny.
SHAPES = ((64, 128), (12, 96), (7, 33), (5, 4099), (3, 1), (1, 2049))
BACKEND_IDS = [b if isa is None else f"{b}-{isa}" for b, isa in CPU_BACKENDS]


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "double-quant"])
def test_dequantize_bit_exact_against_bitsandbytes(use_backend, blocksize, nested):
    generator = torch.Generator().manual_seed(blocksize)
    for index, shape in enumerate(SHAPES):
        dtype = DTYPES[index % 3]
        storage = (torch.uint8, torch.bfloat16, torch.float16, torch.float32)[index % 4]
        weight = (torch.randn(shape, generator=generator) * 3).to(dtype)
        try:
            packed, state = quantize(weight, blocksize, nested, storage)
        except (RuntimeError, ValueError):  # storage wider than the packed bytes of a tiny weight
            packed, state = quantize(weight, blocksize, nested)
        expected = bnb_generic_dequantize(packed, state)
        if bnb_cpu_kernel_reads_exactly(shape, blocksize):
            torch.testing.assert_close(bnbf.dequantize_4bit(packed, state), expected, rtol=0, atol=0)
        for backend, isa in CPU_BACKENDS:
            use_backend(backend, isa)
            ours = lolakernels.nf4_dequantize(packed, state)
            assert ours.dtype == dtype and ours.shape == torch.Size(shape)
            assert torch.equal(ours, expected), (shape, dtype, storage, backend, isa)


@pytest.mark.parametrize("backend,isa", CPU_BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
def test_dequantize_to_another_dtype_rounds_once(use_backend, backend, isa, out_dtype):
    use_backend(backend, isa)
    weight = torch.randn(40, 72, generator=torch.Generator().manual_seed(3))
    packed, state = quantize(weight, 64, True)
    expected = reference.nf4_dequantize(read_nf4(packed, state), torch.float32).to(out_dtype)
    assert torch.equal(lolakernels.nf4_dequantize(packed, state, out_dtype=out_dtype), expected)


def test_dequantize_denormal_and_large_absmax_round_like_torch(use_backend):
    """Tiny and huge block scales exercise subnormal fp16/bf16 results and fp16 overflow."""
    weight = torch.randn(4, 64)
    packed, state = quantize(weight, 32, False)
    state.absmax = torch.tensor([1e-38, 3e-5, 7e4, 1e-7, 1.0, 2e-40, 65504.0, 0.5])
    for out_dtype in DTYPES:
        expected = reference.nf4_dequantize(read_nf4(packed, state), torch.float32).to(out_dtype)
        for backend, isa in CPU_BACKENDS:
            use_backend(backend, isa)
            assert torch.equal(lolakernels.nf4_dequantize(packed, state, out_dtype=out_dtype), expected), (backend, isa, out_dtype)


def _linear_case(n, k, m, *, blocksize=64, nested=True, state_dtype=torch.bfloat16, x_dtype=torch.float32,
                 rank=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=generator).to(state_dtype)
    packed, state = quantize(weight, blocksize, nested)
    x = torch.randn(m, k, generator=generator).to(x_dtype)
    lora_a = torch.randn(rank, k, generator=generator) / k ** 0.5
    lora_b = torch.randn(n, rank, generator=generator) / rank ** 0.5
    bias = torch.randn(n, generator=generator)
    magnitude = torch.rand(n, generator=generator) * k ** 0.5 + 1
    return packed, state, x, lora_a, lora_b, bias, magnitude


LINEAR_SHAPES = ((96, 128, 1), (33, 96, 4), (40, 256, 5), (17, 70, 9), (24, 33, 2), (64, 128, 0))


@pytest.mark.parametrize("backend,isa", CPU_BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("compute_dtype,x_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                    (torch.bfloat16, torch.float32), (torch.float16, torch.float16)],
                         ids=["fp32", "bf16", "bf16-compute-fp32-x", "fp16"])
@pytest.mark.parametrize("variant", ["plain", "lora-bias", "dora", "dora-bias"])
def test_linear_matches_reference(use_backend, backend, isa, compute_dtype, x_dtype, variant):
    if backend == "cpu" and compute_dtype == torch.float16:
        pytest.skip("the cpu kernel computes in float32 / bfloat16 (float16 falls back to the reference)")
    use_backend(backend, isa)
    for index, (n, k, m) in enumerate(LINEAR_SHAPES):
        if variant in ("plain", "dora") and index % 2:
            continue
        packed, state, x, lora_a, lora_b, bias, magnitude = _linear_case(
            n, k, m, x_dtype=x_dtype, nested=index % 2 == 0, blocksize=(64, 32, 128)[index % 3], seed=index)
        kwargs = dict(bias=bias if "bias" in variant else None, magnitude=magnitude if "dora" in variant else None,
                      compute_dtype=compute_dtype)
        lora = (None, None, 0.0) if variant == "plain" else (lora_a, lora_b, 0.75)
        ours = lolakernels.nf4_lora_linear(x, packed, state, *lora, **kwargs)
        nf4 = read_nf4(packed, state)
        norm = None if kwargs["magnitude"] is None else reference.dora_weight_norm(nf4, lora_a, lora_b, 0.75)
        expected = reference.nf4_lora_linear(x, nf4, compute_dtype, None, *lora[:2], lora[2], kwargs["bias"],
                                             kwargs["magnitude"], norm)
        assert ours.dtype == x_dtype and ours.shape == (m, n)
        if m == 0:
            continue
        # The same roundings; only the fp32 summation order differs: a few ulps of the output dtype.
        magnitude_of = float(expected.float().abs().max())
        ulp = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[x_dtype]
        if compute_dtype != torch.float32 or x_dtype != torch.float32:
            ulp = 8e-3 if torch.bfloat16 in (compute_dtype, x_dtype) else 2e-3
        error = float((ours.float() - expected.float()).abs().max())
        assert error <= ulp * magnitude_of, (n, k, m, error, magnitude_of)


@pytest.mark.parametrize("backend,isa", CPU_BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256])
@pytest.mark.parametrize("nested", [True, False], ids=["double-quant", "fp32-absmax"])
def test_linear_reads_each_weight_exactly_across_absmax_groups(use_backend, backend, isa, blocksize, nested):
    """x = unit vectors: each output is one weight times 1, so the bf16 decode GEMV must return
    dequantize_4bit's values bit for bit, at columns spread over rows wider than the kernel's absmax
    chunk (4096) and over many absmax groups (256 blocks), whose edges fall mid-step."""
    use_backend(backend, isa)
    n, k = 24, 4224
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(blocksize)).to(torch.bfloat16)
    packed, state = quantize(weight, blocksize, nested)
    expected = bnb_generic_dequantize(packed, state)
    columns = torch.tensor(sorted({0, 31, 32, 63, 64, 4095, 4096, 4223} | set(range(5, k, 263))))
    for chunk in columns.split(4):
        x = torch.zeros(len(chunk), k, dtype=torch.bfloat16)
        x[torch.arange(len(chunk)), chunk] = 1.0
        ours = lolakernels.nf4_lora_linear(x, packed, state, None, None, 0.0)
        assert torch.equal(ours, expected[:, chunk].T), (blocksize, nested, chunk.tolist())


@pytest.mark.parametrize("backend,isa", CPU_BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("m", [1, 7, 8, 9])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_linear_adapter_term_across_the_decode_shrink(use_backend, backend, isa, m, x_dtype):
    """Up to 8 tokens the cpu kernel forms x · lora_aᵀ itself, beyond that one BLAS call does: the
    adapter's term alone (the output minus the plain layer's) is the fp64 product either way."""
    use_backend(backend, isa)
    packed, state, x, lora_a, lora_b, _, _ = _linear_case(40, 96, m, rank=17, x_dtype=x_dtype, seed=m)
    wide = torch.zeros(m, 100, dtype=x_dtype)
    wide[:, 2:98] = x
    x = wide[:, 2:98]  # rows with a stride: the kernel's own shrink reads them in place
    # A large scale makes the adapter's term dominate the bf16 output's rounding.
    scale = 2.0 if x_dtype == torch.float32 else 1000.0
    ours = lolakernels.nf4_lora_linear(x, packed, state, lora_a, lora_b, scale, compute_dtype=torch.float32)
    plain = lolakernels.nf4_lora_linear(x, packed, state, None, None, 0.0, compute_dtype=torch.float32)
    expected = scale * (x.double() @ lora_a.double().T) @ lora_b.double().T
    tolerance = (2e-5 if x_dtype == torch.float32 else 1e-2) * float(expected.abs().max())
    torch.testing.assert_close((ours.double() - plain.double()), expected, rtol=0, atol=tolerance)


def test_linear_accepts_batched_inputs_and_strided_rows(use_backend):
    use_backend("cpu")
    packed, state, x, lora_a, lora_b, bias, _ = _linear_case(48, 64, 6)
    x3 = x.reshape(2, 3, 64)
    flat = lolakernels.nf4_lora_linear(x, packed, state, lora_a, lora_b, 0.5, bias=bias)
    torch.testing.assert_close(lolakernels.nf4_lora_linear(x3, packed, state, lora_a, lora_b, 0.5, bias=bias),
                               flat.reshape(2, 3, 48), rtol=0, atol=0)
    wide = torch.zeros(6, 80)
    wide[:, :64] = x
    torch.testing.assert_close(lolakernels.nf4_lora_linear(wide[:, :64], packed, state, lora_a, lora_b, 0.5,
                                                           bias=bias), flat, rtol=0, atol=0)


def test_read_nf4_is_memoized_until_the_pair_changes():
    from lolakernels.ops import nf4 as ops_nf4

    packed, state, *_ = _linear_case(32, 64, 1)
    first = read_nf4(packed, state)
    assert read_nf4(packed, state) is first
    # Bytes updated in place: read again, and the numbers follow.
    packed.bitwise_xor_(0x35)
    assert read_nf4(packed, state) is not first
    assert torch.equal(lolakernels.nf4_dequantize(packed, state), bnb_generic_dequantize(packed, state))
    # A replaced absmax tensor, or another weight tensor with this state: read again and checked.
    second = read_nf4(packed, state)
    state.absmax = state.absmax.clone()
    assert read_nf4(packed, state) is not second
    with pytest.raises(ValueError, match="bytes"):
        read_nf4(packed[:-4], state)
    # Fields that make the pair unreadable are refused after a memoized read too.
    read_nf4(packed, state)
    state.quant_type = "fp4"
    with pytest.raises(ValueError, match="quant_type"):
        read_nf4(packed, state)
    state.quant_type = "nf4"
    read_nf4(packed, state)
    state.packing_format_for_cpu = True
    with pytest.raises(ValueError, match="packing_format_for_cpu"):
        read_nf4(packed, state)
    # The entry goes with its state.
    key = id(state)
    assert key in ops_nf4._reads
    del state
    gc.collect()
    assert key not in ops_nf4._reads


def test_dora_weight_norm_is_cached_and_invalidated():
    packed, state, x, lora_a, lora_b, _, magnitude = _linear_case(32, 64, 2)
    from lolakernels.ops import nf4 as ops_nf4

    nf4 = read_nf4(packed, state)
    first = ops_nf4.dora_weight_norm(nf4, lora_a, lora_b, 0.5)
    assert ops_nf4.dora_weight_norm(nf4, lora_a, lora_b, 0.5) is first
    with torch.no_grad():
        lora_b.mul_(2)  # an optimizer step: in place, bumps the version
    second = ops_nf4.dora_weight_norm(nf4, lora_a, lora_b, 0.5)
    assert second is not first
    torch.testing.assert_close(second, reference.dora_weight_norm(nf4, lora_a, lora_b, 0.5))
    assert ops_nf4.dora_weight_norm(nf4, lora_a, lora_b, 0.25) is not second


# ----- refusals ---------------------------------------------------------------------------------

def test_fp4_state_is_refused():
    packed, state = quantize(torch.randn(16, 64), quant_type="fp4")
    with pytest.raises(ValueError, match="quant_type is 'fp4'; only 'nf4'"):
        lolakernels.nf4_dequantize(packed, state)
    with pytest.raises(ValueError, match="quant_type is 'fp4'"):
        lolakernels.nf4_lora_linear(torch.randn(2, 64), packed, state, None, None, 0.0)


def test_cpu_repacked_layout_is_refused():
    """bitsandbytes repacks in place on the first eval forward on AVX512-BF16 CPUs; here the repacking
    is applied directly so the test runs on every CPU."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    packed, state = quantize(torch.randn(64, 128).to(torch.bfloat16))
    repacked, repacked_state = _convert_weight_packed_for_cpu(packed, state)
    assert repacked_state.packing_format_for_cpu
    with pytest.raises(ValueError, match="packing_format_for_cpu is set: bitsandbytes repacked this weight"):
        lolakernels.nf4_dequantize(repacked, repacked_state)
    with pytest.raises(ValueError, match="packing_format_for_cpu"):
        lolakernels.nf4_lora_linear(torch.randn(1, 128), repacked, repacked_state, None, None, 0.0)


def test_linear4bit_eval_forward_repacks_and_is_then_refused():
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(128, 64, quant_type="nf4", compute_dtype=torch.bfloat16)
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 128), requires_grad=False, quant_type="nf4").to("cpu")
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(1, 128, dtype=torch.bfloat16))
    state = layer.weight.quant_state
    if not getattr(state, "packing_format_for_cpu", False):
        pytest.skip("bitsandbytes did not repack on this CPU (no AVX512-BF16)")
    with pytest.raises(ValueError, match="packing_format_for_cpu"):
        lolakernels.nf4_dequantize(layer.weight, state)


@pytest.mark.parametrize("change,message", [
    (lambda p, s: (p[:-1], s), "weight holds 1023 bytes but quant_state.shape [32, 64] needs 1024"),
    (lambda p, s: (p.view(2, -1).t(), s), "weight must be contiguous"),
    (lambda p, s: (p.to(torch.int32), s), "weight has dtype int32"),
    (lambda p, s: (p, setattr(s, "blocksize", 48) or s), "quant_state.blocksize is 48"),
    (lambda p, s: (p, setattr(s, "absmax", s.absmax[:-1]) or s), "quant_state.absmax has 31 values but 2048"),
    (lambda p, s: (p, setattr(s, "absmax", s.absmax.half()) or s), "quant_state.absmax has dtype float16"),
    (lambda p, s: (p, setattr(s, "dtype", torch.int8) or s), "quant_state.dtype is torch.int8"),
    (lambda p, s: (p, object()), "quant_state must be a bitsandbytes QuantState"),
])
def test_bad_weight_or_state_is_refused(change, message):
    packed, state = quantize(torch.randn(32, 64), nested=False)
    packed, state = change(packed, state)
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        lolakernels.nf4_dequantize(packed, state)


@pytest.mark.parametrize("overrides,message", [
    (dict(x=torch.randn(3, 65)), "x.shape[-1] = 65 but the weight has in_features = 64"),
    (dict(x=torch.randint(0, 3, (3, 64))), "x has dtype int64"),
    (dict(lora_a=torch.randn(4, 63)), "lora_a.shape[1] = 63 but in_features is 64"),
    (dict(lora_b=torch.randn(32, 5)), "lora_b has shape [32, 5]; expected [out_features, r] = [32, 4]"),
    (dict(lora_b=torch.randn(32, 4).double()), "lora_a / lora_b have dtypes float32 / float64"),
    (dict(lora_b=None), "lora_a and lora_b go together"),
    (dict(bias=torch.randn(31)), "bias must be [out_features] = [32]"),
    (dict(magnitude=torch.randn(32, 1)), "magnitude must be [out_features] = [32]"),
    (dict(magnitude=torch.ones(32), dropout_p=0.1), "DoRA with dropout_p > 0 is not implemented"),
    (dict(dropout_p=1.0), "dropout_p must be in [0, 1)"),
    (dict(scale=float("nan")), "scale must be a finite float"),
    (dict(compute_dtype=torch.int8), "compute_dtype is torch.int8"),
    (dict(x=torch.randn(3, 64, device="meta")), "x is on meta but the weight is on cpu"),
])
def test_bad_linear_arguments_are_refused(overrides, message):
    packed, state = quantize(torch.randn(32, 64))
    args = dict(x=torch.randn(3, 64), weight=packed, quant_state=state, lora_a=torch.randn(4, 64),
                lora_b=torch.randn(32, 4), scale=0.5)
    args.update(overrides)
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        lolakernels.nf4_lora_linear(**args)


def test_three_dimensional_weight_cannot_be_a_linear_layer():
    packed, state = quantize(torch.randn(2, 8, 64))
    assert lolakernels.nf4_dequantize(packed, state).shape == (2, 8, 64)
    with pytest.raises(ValueError, match="needs a 2-D"):
        lolakernels.nf4_lora_linear(torch.randn(1, 64), packed, state, None, None, 0.0)
