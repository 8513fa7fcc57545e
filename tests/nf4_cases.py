"""bitsandbytes nf4 weights for the nf4 tests, and the docs/design.md §3 tolerance rule applied against an
fp64 oracle built from the same dequantized weights."""
from __future__ import annotations

import torch
from torch import Tensor

from lora_cases import RELATIVE_FLOOR


def quantize(weight: Tensor, blocksize: int = 64, nested: bool = True, storage: torch.dtype = torch.uint8,
             quant_type: str = "nf4"):
    """(packed, quant_state) from bitsandbytes' own quantize_4bit."""
    import bitsandbytes.functional as bnbf

    return bnbf.quantize_4bit(weight, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type,
                              quant_storage=storage)


def bnb_generic_dequantize(packed: Tensor, quant_state) -> Tensor:
    """bitsandbytes' device-independent dequantize (its default backend, eager), for the shapes where
    its CPU library kernel indexes blocks per row (K % blocksize != 0, K even, blocksize < 2048)."""
    import bitsandbytes.functional as bnbf
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    absmax = quant_state.absmax
    if quant_state.nested:
        absmax = bnbf.dequantize_blockwise(quant_state.absmax, quant_state.state2) + quant_state.offset
    compute = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
    return compute(packed.view(torch.uint8).reshape(-1), absmax.float(), _get_4bit_code("nf4", packed.device),
                   quant_state.blocksize, quant_state.shape, quant_state.dtype)


def bnb_cpu_kernel_reads_exactly(shape, blocksize: int) -> bool:
    """Where bitsandbytes 0.50.2's CPU library kernel serves dequantize_4bit and is right. It indexes
    blocks per row, which matches the flat blocks only when they do not straddle rows. (For odd K and
    blocksize >= 2048 dequantize_4bit runs the generic implementation, torch.compile'd per shape,
    which bnb_generic_dequantize runs eagerly.)"""
    k = shape[-1]
    return k % 2 == 0 and blocksize < 2048 and k % blocksize == 0


def assert_within_plain_torch_error(ours: Tensor, plain: Tensor, oracle: Tensor, what: str = "output") -> None:
    """ours vs an fp64 oracle: at most 2x the error of the plain-PyTorch (bitsandbytes + PEFT) path
    in the same dtype, or the dtype's floor relative to the largest |oracle|."""
    assert ours.shape == plain.shape == oracle.shape, (ours.shape, plain.shape, oracle.shape)
    assert ours.dtype == plain.dtype, (ours.dtype, plain.dtype)
    if oracle.numel() == 0:
        return
    magnitude = max(float(oracle.abs().max()), 1e-6)
    error = float((ours.double() - oracle).abs().max())
    plain_error = float((plain.double() - oracle).abs().max())
    allowed = max(2 * plain_error, RELATIVE_FLOOR[ours.dtype] * magnitude)
    assert error <= allowed, (f"{what}: max error {error:.3g} > allowed {allowed:.3g} (plain PyTorch error "
                              f"{plain_error:.3g}, |oracle| max {magnitude:.3g})")
