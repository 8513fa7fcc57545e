"""CUDA decode backend (thin wrapper over the ``lolakernels._cuda`` extension).

The extension works on raw device pointers and an explicit stream (it includes no torch
header), so this module turns tensors into ``data_ptr()`` integers, sizes and strides, and
passes the current stream of the tensors' device. Inputs are expected to be validated
by the caller (same dtype for x / lora_a / lora_b / sigma / out, unit column strides for
x and out, contiguous weights, int32 ids / basis_of / ranks, fp32 adapter_scale).

Semantics are those of :func:`lolakernels.reference.shared_basis_lora_`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._raw import address, sigma_kind

if TYPE_CHECKING:
    from .reference.nf4 import Nf4Weight

CUDA_DTYPES = (torch.float16, torch.bfloat16)
# The largest number of tokens the decode kernels are tuned for (larger batches still run).
DECODE_MAX_TOKENS = 64
# Token counts the nf4 decode GEMV serves (more tokens run on triton); kNf4GemvMaxTokens in csrc/cuda/nf4.cuh.
NF4_DECODE_MAX_TOKENS = 16

_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1}


def _module():
    """The compiled extension ``lolakernels._cuda``; ImportError with the reason if absent."""
    try:
        from . import _cuda  # type: ignore[attr-defined]
    except ImportError as exc:
        raise ImportError(
            "lolakernels._cuda is not available: the CUDA extension was not built or cannot be "
            f"loaded ({exc}). Build the package with CUDA enabled (nvcc on PATH) to use the "
            "CUDA backend."
        ) from exc
    return _cuda


def available() -> tuple[bool, str]:
    """Whether the CUDA backend can run here, and the reason when it cannot."""
    try:
        module = _module()
    except ImportError as exc:
        return False, str(exc)
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible to PyTorch (torch.cuda.is_available() is False)"
    if module.device_count() == 0:
        return False, "the lolakernels._cuda extension sees no CUDA device (driver missing or too old?)"
    return True, ""


def shared_basis_lora_(
    out: Tensor,
    out_offset: int,
    x: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    sigma: Optional[Tensor],
    ids: Tensor,
    basis_of: Tensor,
    scale: float,
    adapter_scale: Optional[Tensor],
    ranks: Optional[Tensor],
) -> None:
    """Adds the LoRA term into ``out[:, out_offset : out_offset + d_out]`` (one rounding).

    x [T, d_in], lora_a [C, R, d_in], lora_b [C, d_out, R], sigma None / [N, R] / [N, R, R],
    ids [T] int32 (-1: token untouched), basis_of [N] int32, adapter_scale [N] fp32 or None,
    ranks [N] int32 or None. Asynchronous on the current stream of ``x.device``.
    """
    module = _module()
    dtype = _DTYPE_CODES.get(x.dtype)
    if dtype is None:
        raise TypeError(f"CUDA shared_basis_lora_ supports {CUDA_DTYPES}, got {x.dtype}")
    num_tokens, d_in = x.shape
    num_clusters, rank, _ = lora_a.shape
    d_out = lora_b.shape[1]
    num_adapters = basis_of.shape[0]
    with torch.cuda.device(x.device):
        # h (then g) per token, fp32; allocated on the current stream like the launch.
        workspace = torch.empty(num_tokens * rank, dtype=torch.float32, device=x.device)
        stream = torch.cuda.current_stream(x.device).cuda_stream
        module.shared_basis_lora_decode(
            out.data_ptr(), out.stride(0), int(out_offset),
            x.data_ptr(), x.stride(0),
            lora_a.data_ptr(), lora_b.data_ptr(),
            address(sigma), sigma_kind(sigma),
            ids.data_ptr(), basis_of.data_ptr(),
            float(scale), address(adapter_scale), address(ranks),
            workspace.data_ptr(),
            num_tokens, d_in, d_out, rank,
            num_adapters, num_clusters,
            dtype, stream,
        )


def nf4_decline_reason(case) -> Optional[str]:
    """Why the CUDA extension cannot run this nf4 case (None when it can)."""
    module = _module()
    if not hasattr(module, "nf4_gemv"):
        return "this build of lolakernels._cuda has no nf4 kernels"
    if case.op != "nf4_lora_linear":
        return "the cuda backend has nf4 decode (GEMV) kernels only; dequantize runs on triton"
    if case.num_tokens > NF4_DECODE_MAX_TOKENS:
        return f"{case.num_tokens} tokens > {NF4_DECODE_MAX_TOKENS}: the cuda nf4 kernel serves decode batches only"
    if case.dtype not in CUDA_DTYPES or case.out_dtype != case.dtype or case.lora_dtype not in (None, torch.float32):
        return "the cuda nf4 kernel takes float16 / bfloat16 inputs computed in their own dtype and fp32 adapters"
    return None


def nf4_lora_linear(
    x: Tensor,
    weight: "Nf4Weight",
    compute_dtype: torch.dtype,
    x_lora: Optional[Tensor],
    lora_a: Optional[Tensor],
    lora_b: Optional[Tensor],
    scale: float,
    bias: Optional[Tensor],
    magnitude: Optional[Tensor],
    weight_norm: Optional[Tensor],
) -> Tensor:
    """``lolakernels.reference.nf4.nf4_lora_linear`` for a decode batch on validated 2-D CUDA
    tensors (x [M, K], M <= NF4_DECODE_MAX_TOKENS, x in the compute dtype float16 / bfloat16,
    adapters fp32: the cases :func:`nf4_decline_reason` accepts). One GEMV over the packed weight
    (csrc/cuda/nf4.cu) with the LoRA / DoRA expand in its epilogue; the shrink h = x_L · lora_aᵀ
    [M, r] is one small product computed here, once."""
    module = _module()
    n, k = weight.shape
    m = x.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    x_compute = x.to(compute_dtype)
    if x_compute.stride(-1) != 1:
        x_compute = x_compute.contiguous()
    bias_compute = None if bias is None else bias.to(compute_dtype).contiguous()
    lora_h = lora_b_c = dora_scale = None
    rank = 0
    if lora_a is not None:
        rank = lora_a.shape[0]
        lora_h = F.linear(x.to(lora_a.dtype) if x_lora is None else x_lora, lora_a).float().contiguous()
        lora_b_c = lora_b.float().contiguous()
        if magnitude is not None:
            dora_scale = (magnitude / weight_norm).float().contiguous()
    with torch.cuda.device(x.device):
        stream = torch.cuda.current_stream(x.device).cuda_stream
        module.nf4_gemv(
            out.data_ptr(), out.stride(0), x_compute.data_ptr(), x_compute.stride(0),
            weight.packed.data_ptr(), weight.numel, weight.blocksize,
            address(weight.absmax), address(weight.absmax_q), address(weight.absmax_code),
            address(weight.absmax_scale), weight.absmax_blocksize, address(weight.absmax_offset), n, k,
            address(bias_compute), address(lora_h), address(lora_b_c), rank, float(scale), address(dora_scale),
            m, _DTYPE_CODES[compute_dtype], stream,
        )
    return out
