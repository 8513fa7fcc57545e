"""Triton backend of the nf4 family: dequantize, and the linear layer with the LoRA / DoRA term.

Storage and rounding rules are those of ``lolakernels.reference.nf4`` (docs/design.md §4): element ``j``
of the flattened weight is the code index in byte ``j // 2`` (high nibble for even ``j``) and

    W[j] = dtype(NF4_CODE[index_j] * absmax[j // blocksize])          (fp32 product, one rounding)
    absmax[b] = code2[q[b]] * absmax2[b // blocksize2] + offset       (double quantization)

Every kernel here is launched with ``enable_fp_fusion=False``: a fused multiply-add in the absmax
decode or in the epilogue would round differently from the reference's separate operations.

The linear layer, for x [M, K], weight [N, K], lora_a [r, K], lora_b [N, r], computes

    acc  = Σ_k x_C[m, k] · W_C[n, k]            fp32 sums of compute-dtype (C) operands
    base = X(C(acc + bias_C))                    X: x's dtype
    t    = L(h · lora_bᵀ),  h = L(x_L · lora_aᵀ)  L: the adapter's dtype; h is computed once, [M, r]
    LoRA: y = X(base + X(L(t · scale)))
    DoRA: y = X(base + ((s − 1) · P(base − bias_C) + (s · t) · scale))   s = magnitude / ‖·‖_row (fp32)

(P: the promoted type of X and C.) Two launch shapes of one dequantize-in-GEMM kernel:

* few tokens (M ≤ ``GEMV_MAX_TOKENS``): split-K GEMV. Each program owns a [BLOCK_N, K-chunk] slice
  of the weight for every token, so each packed byte is read from memory once; the fp32 partial
  sums of the chunks go to a workspace and a second kernel adds them in a fixed order (no atomics:
  results do not depend on scheduling) and applies the epilogue.
* many tokens: tiles of [BLOCK_M, BLOCK_N] outputs looping over K, the epilogue in the same kernel.

When K is even, a tile of packed bytes is decoded as two half-width tiles (high nibbles = even k,
low nibbles = odd k) and multiplied with the even and odd columns of x: no nibble interleaving.
With odd K a row starts in the middle of a byte, so each element is decoded from its own byte.

Launch grids depend only on shapes (no host synchronisation). DoRA runs here when the adapter is
fp32 (PEFT's default); the backward re-dequantizes tiles through :func:`dequantize_rows`.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ..reference import nf4 as reference
from ..reference.nf4 import NF4_CODE_VALUES, Nf4Weight

TRITON_NF4_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Token counts served by the split-K GEMV launch; larger batches use the tiled GEMM launch.
GEMV_MAX_TOKENS = 16
# Elements per program of the dequantize kernel.
DEQUANTIZE_BLOCK = 1024

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _next_power_of_2(value: int) -> int:
    return 1 << max(0, int(value) - 1).bit_length()


def _shift(value: int) -> int:
    """log2 of a power of two (bitsandbytes' blocksizes always are; checked by the caller)."""
    return int(value).bit_length() - 1


def _is_power_of_2(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


@functools.lru_cache(maxsize=None)
def _code_table(device: torch.device) -> Tensor:
    return torch.tensor(NF4_CODE_VALUES, dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=None)
def _cuda_multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    """How many programs a launch should expose to keep every SM busy."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return 2 * _cuda_multiprocessors(index)
    # The interpreter runs programs one after another: few, larger programs are fastest.
    return 4


def _storage_args(weight: Nf4Weight) -> tuple:
    """(absmax, absmax_q, absmax_code, absmax_scale, absmax_offset, block shift, absmax block shift)
    kernel arguments; unused pointers are replaced by the packed tensor (never read)."""
    placeholder = weight.packed
    return (
        weight.absmax if weight.absmax is not None else placeholder,
        weight.absmax_q if weight.absmax_q is not None else placeholder,
        weight.absmax_code if weight.absmax_code is not None else placeholder,
        weight.absmax_scale if weight.absmax_scale is not None else placeholder,
        weight.absmax_offset if weight.absmax_offset is not None else placeholder,
        _shift(weight.blocksize),
        _shift(weight.absmax_blocksize) if weight.nested else 0,
    )


def _supported(weight: Nf4Weight) -> bool:
    """Whether the kernels' shift-based block indexing applies (always, for bitsandbytes states)."""
    return _is_power_of_2(weight.blocksize) and (not weight.nested or _is_power_of_2(weight.absmax_blocksize))


@triton.jit
def _block_absmax(block, mask, absmax, absmax_q, absmax_code, absmax_scale, absmax_offset, absmax_shift,
                  NESTED: tl.constexpr):
    """fp32 absmax of the blocks `block` (any shape), decoding the double quantization."""
    if NESTED:
        q = tl.load(absmax_q + block, mask=mask, other=0).to(tl.int32)
        scaled = tl.load(absmax_code + q, mask=mask, other=0.0) * tl.load(absmax_scale + (block >> absmax_shift),
                                                                          mask=mask, other=0.0)
        return scaled + tl.load(absmax_offset)
    else:
        return tl.load(absmax + block, mask=mask, other=0.0)


@triton.jit
def _dequantize_kernel(
    out, packed, code, absmax, absmax_q, absmax_code, absmax_scale, absmax_offset,
    begin, count, block_shift, absmax_shift,
    NESTED: tl.constexpr, BLOCK: tl.constexpr,
):
    """out[i] = W[begin + i] for i < count (any begin, any count)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < count
    j = begin + i
    byte = tl.load(packed + (j >> 1), mask=mask, other=0).to(tl.int32)
    index = tl.where((j & 1) == 0, byte >> 4, byte & 15)
    scale = _block_absmax(j >> block_shift, mask, absmax, absmax_q, absmax_code, absmax_scale, absmax_offset,
                          absmax_shift, NESTED)
    value = tl.load(code + index) * scale
    tl.store(out + i, value.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _nf4_tile_product(
    acc, x, stride_xm, packed, code, absmax, absmax_q, absmax_code, absmax_scale, absmax_offset,
    block_shift, absmax_shift, offs_m, offs_n, m_mask, n_mask, k0, k_end, K,
    NESTED: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr, FP32_DOT: tl.constexpr,
):
    """acc[BLOCK_M, BLOCK_N] += x[offs_m, k0:k1] · W_C[offs_n, k0:k1]ᵀ, k1 = min(k0 + BLOCK_K, k_end),
    W (rows of K elements) decoded from the packed bytes and rounded to x's (the compute) dtype."""
    compute = x.dtype.element_ty
    if EVEN_K:
        # Byte c of the tile holds columns k0 + 2c (high nibble) and k0 + 2c + 1 (low nibble), and
        # both lie in one block (blocksizes are even, the pair starts at an even flat index).
        offs_c = tl.arange(0, BLOCK_K // 2)
        k_even = k0 + 2 * offs_c
        k_mask = k_even < k_end
        w_mask = n_mask[:, None] & k_mask[None, :]
        j = offs_n.to(tl.int64)[:, None] * K + k_even[None, :]
        byte = tl.load(packed + (j >> 1), mask=w_mask, other=0).to(tl.int32)
        scale = _block_absmax(j >> block_shift, w_mask, absmax, absmax_q, absmax_code, absmax_scale,
                              absmax_offset, absmax_shift, NESTED)
        w_hi = (tl.load(code + (byte >> 4)) * scale).to(compute)
        w_lo = (tl.load(code + (byte & 15)) * scale).to(compute)
        x_mask = m_mask[:, None] & k_mask[None, :]
        x_row = x + offs_m.to(tl.int64)[:, None] * stride_xm + k_even[None, :]
        x_even = tl.load(x_row, mask=x_mask, other=0.0)
        x_odd = tl.load(x_row + 1, mask=x_mask, other=0.0)
        if FP32_DOT:
            acc = tl.dot(x_even, tl.trans(w_hi), acc, input_precision="ieee")
            acc = tl.dot(x_odd, tl.trans(w_lo), acc, input_precision="ieee")
        else:
            acc = tl.dot(x_even, tl.trans(w_hi), acc)
            acc = tl.dot(x_odd, tl.trans(w_lo), acc)
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_end
        w_mask = n_mask[:, None] & k_mask[None, :]
        j = offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
        byte = tl.load(packed + (j >> 1), mask=w_mask, other=0).to(tl.int32)
        index = tl.where((j & 1) == 0, byte >> 4, byte & 15)
        scale = _block_absmax(j >> block_shift, w_mask, absmax, absmax_q, absmax_code, absmax_scale,
                              absmax_offset, absmax_shift, NESTED)
        w = (tl.load(code + index) * scale).to(compute)
        x_tile = tl.load(x + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :],
                         mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if FP32_DOT:
            acc = tl.dot(x_tile, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x_tile, tl.trans(w), acc)
    return acc


@triton.jit
def _epilogue(
    acc, out, stride_om, bias, lora_h, lora_b, rank, scale, dora_scale, offs_m, offs_n, m_mask, n_mask,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_DORA: tl.constexpr, ROUND_BASE_MINUS_BIAS: tl.constexpr,
    RANK_PAD: tl.constexpr, FP32_LORA: tl.constexpr,
):
    """Bias, the roundings of the base product, the LoRA / DoRA term, the store (module docstring)."""
    compute = bias.dtype.element_ty
    out_type = out.dtype.element_ty
    bias_n = tl.zeros_like(offs_n).to(tl.float32)
    value = acc
    if HAS_BIAS:
        bias_n = tl.load(bias + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        value = value + bias_n[None, :]
    value = value.to(compute).to(out_type).to(tl.float32)
    if HAS_LORA:
        lora_type = lora_h.dtype.element_ty
        offs_r = tl.arange(0, RANK_PAD)
        r_mask = offs_r < rank
        h = tl.load(lora_h + offs_m.to(tl.int64)[:, None] * rank + offs_r[None, :],
                    mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        b = tl.load(lora_b + offs_n.to(tl.int64)[:, None] * rank + offs_r[None, :],
                    mask=n_mask[:, None] & r_mask[None, :], other=0.0)
        if FP32_LORA:
            t = tl.dot(h, tl.trans(b), input_precision="ieee")
        else:
            t = tl.dot(h, tl.trans(b))
        t = t.to(lora_type).to(tl.float32)
        if HAS_DORA:
            s = tl.load(dora_scale + offs_n, mask=n_mask, other=1.0)[None, :]
            base = value
            if HAS_BIAS:
                base = value - bias_n[None, :]
                if ROUND_BASE_MINUS_BIAS:
                    base = base.to(out_type).to(tl.float32)
            kept = (s - 1.0) * base
            added = (s * t) * scale
            value = value + (kept + added)
        else:
            term = (t * scale).to(lora_type).to(out_type).to(tl.float32)
            value = value + term
    tl.store(out + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :], value.to(out_type),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _nf4_linear_kernel(
    out, stride_om, x, stride_xm, packed, code, absmax, absmax_q, absmax_code, absmax_scale, absmax_offset,
    block_shift, absmax_shift, bias, lora_h, lora_b, rank, scale, dora_scale, M, N, K,
    NESTED: tl.constexpr, EVEN_K: tl.constexpr, FP32_DOT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_DORA: tl.constexpr, ROUND_BASE_MINUS_BIAS: tl.constexpr,
    RANK_PAD: tl.constexpr, FP32_LORA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Tiled GEMM: out[BLOCK_M, BLOCK_N] tile of program (pid_m, pid_n), the whole K, then the epilogue."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        acc = _nf4_tile_product(acc, x, stride_xm, packed, code, absmax, absmax_q, absmax_code, absmax_scale,
                                absmax_offset, block_shift, absmax_shift, offs_m, offs_n, m_mask, n_mask, k0, K, K,
                                NESTED, EVEN_K, BLOCK_K, FP32_DOT)
    _epilogue(acc, out, stride_om, bias, lora_h, lora_b, rank, scale, dora_scale, offs_m, offs_n, m_mask, n_mask,
              HAS_BIAS, HAS_LORA, HAS_DORA, ROUND_BASE_MINUS_BIAS, RANK_PAD, FP32_LORA)


@triton.jit
def _nf4_gemv_split_kernel(
    partial, x, stride_xm, packed, code, absmax, absmax_q, absmax_code, absmax_scale, absmax_offset,
    block_shift, absmax_shift, M, N, K, k_per_split,
    NESTED: tl.constexpr, EVEN_K: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """partial[split, m, n] = Σ over this split's K chunk, for all M (≤ BLOCK_M) tokens: every
    weight byte is read by exactly one program."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_begin = split * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        acc = _nf4_tile_product(acc, x, stride_xm, packed, code, absmax, absmax_q, absmax_code, absmax_scale,
                                absmax_offset, block_shift, absmax_shift, offs_m, offs_n, m_mask, n_mask, k0, k_end,
                                K, NESTED, EVEN_K, BLOCK_K, FP32_DOT)
    tl.store(partial + (split * M + offs_m[:, None]).to(tl.int64) * N + offs_n[None, :], acc,
             mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _nf4_gemv_reduce_kernel(
    out, stride_om, partial, splits, bias, lora_h, lora_b, rank, scale, dora_scale, M, N,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_DORA: tl.constexpr, ROUND_BASE_MINUS_BIAS: tl.constexpr,
    RANK_PAD: tl.constexpr, FP32_LORA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Sums the split-K partials in split order, then the epilogue."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    mask = m_mask[:, None] & n_mask[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for split in range(0, splits):
        acc += tl.load(partial + (split * M + offs_m[:, None]).to(tl.int64) * N + offs_n[None, :], mask=mask,
                       other=0.0)
    _epilogue(acc, out, stride_om, bias, lora_h, lora_b, rank, scale, dora_scale, offs_m, offs_n, m_mask, n_mask,
              HAS_BIAS, HAS_LORA, HAS_DORA, ROUND_BASE_MINUS_BIAS, RANK_PAD, FP32_LORA)


def dequantize_range(weight: Nf4Weight, begin: int, count: int, dtype: torch.dtype) -> Tensor:
    """Flat elements [begin, begin + count) of W in ``dtype``, bit for bit as bitsandbytes."""
    if not _supported(weight):
        return reference.dequantize_range(weight, begin, count, dtype)
    out = torch.empty(count, dtype=dtype, device=weight.packed.device)
    if count == 0:
        return out
    absmax, absmax_q, absmax_code, absmax_scale, offset, block_shift, absmax_shift = _storage_args(weight)
    grid = (triton.cdiv(count, DEQUANTIZE_BLOCK),)
    _dequantize_kernel[grid](
        out, weight.packed, _code_table(weight.packed.device), absmax, absmax_q, absmax_code, absmax_scale, offset,
        begin, count, block_shift, absmax_shift,
        NESTED=weight.nested, BLOCK=DEQUANTIZE_BLOCK, enable_fp_fusion=False,
    )
    return out


def nf4_dequantize(weight: Nf4Weight, dtype: torch.dtype) -> Tensor:
    """The whole weight in ``dtype``, shaped like the original tensor."""
    return dequantize_range(weight, 0, weight.numel, dtype).reshape(weight.shape)


def dequantize_rows(weight: Nf4Weight, row0: int, rows: int, dtype: torch.dtype) -> Tensor:
    """Rows [row0, row0 + rows) of the 2-D weight in ``dtype``."""
    k = weight.shape[1]
    return dequantize_range(weight, row0 * k, rows * k, dtype).reshape(rows, k)


def _gemv_launch(m: int, n: int, k: int, device: torch.device, block_n: int, block_k: int) -> tuple[int, int]:
    """(splits, K elements per split) so that N-tiles × splits fill the GPU."""
    n_tiles = triton.cdiv(n, block_n)
    k_blocks = max(1, triton.cdiv(k, block_k))
    splits = min(k_blocks, max(1, triton.cdiv(_target_programs(device), n_tiles)))
    k_per_split = triton.cdiv(k_blocks, splits) * block_k
    return max(1, triton.cdiv(k, k_per_split)), k_per_split


def nf4_lora_linear(
    x: Tensor,
    weight: Nf4Weight,
    compute_dtype: torch.dtype,
    x_lora: Optional[Tensor],
    lora_a: Optional[Tensor],
    lora_b: Optional[Tensor],
    scale: float,
    bias: Optional[Tensor],
    magnitude: Optional[Tensor],
    weight_norm: Optional[Tensor],
    *,
    block_m: Optional[int] = None,
    block_n: Optional[int] = None,
    block_k: Optional[int] = None,
    gemv: Optional[bool] = None,
) -> Tensor:
    """``lolakernels.reference.nf4.nf4_lora_linear`` on validated 2-D tensors (x [M, K] → y [M, N]
    in x's dtype). The keyword arguments override the heuristic tiles and launch (tests, tuning).

    DoRA with an adapter in a dtype other than fp32 runs the reference formula (PEFT keeps
    adapters in fp32, so this is the uncommon case)."""
    n, k = weight.shape
    m = x.shape[0]
    lora_type = None if lora_a is None else lora_a.dtype
    if not _supported(weight) or (magnitude is not None and lora_type != torch.float32):
        return reference.nf4_lora_linear(x, weight, compute_dtype, x_lora, lora_a, lora_b, scale, bias, magnitude,
                                         weight_norm)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    x_compute = x.to(compute_dtype)
    if x_compute.stride(-1) != 1:
        x_compute = x_compute.contiguous()
    bias_compute = x_compute if bias is None else bias.to(compute_dtype).contiguous()
    rank = 0
    lora_h = lora_b_c = dora_scale = x_compute
    if lora_a is not None:
        rank = lora_a.shape[0]
        # The shrink is one small [M, r] product, computed once; the expand runs in the epilogue.
        lora_h = F.linear(x.to(lora_type) if x_lora is None else x_lora, lora_a).contiguous()
        lora_b_c = lora_b.contiguous()
        if magnitude is not None:
            dora_scale = (magnitude / weight_norm).float().contiguous()
    if bias is None:
        # The epilogue reads the compute dtype from the bias pointer's element type.
        bias_compute = x_compute
    absmax, absmax_q, absmax_code, absmax_scale, offset, block_shift, absmax_shift = _storage_args(weight)
    code = _code_table(x.device)
    even_k = k % 2 == 0
    epilogue_flags = dict(
        HAS_BIAS=bias is not None, HAS_LORA=lora_a is not None, HAS_DORA=magnitude is not None,
        # PEFT forms DoRA's (base − bias) in the promoted type of x's and the compute dtype.
        ROUND_BASE_MINUS_BIAS=x.dtype == compute_dtype and x.dtype != torch.float32,
        RANK_PAD=max(16, _next_power_of_2(rank)), FP32_LORA=lora_type == torch.float32,
    )
    storage = (weight.packed, code, absmax, absmax_q, absmax_code, absmax_scale, offset, block_shift, absmax_shift)
    fp32_dot = compute_dtype == torch.float32
    if gemv is None:
        gemv = m <= GEMV_MAX_TOKENS
    if gemv:
        block_m = max(16, _next_power_of_2(m))
        block_n = block_n or 32
        block_k = block_k or (128 if x.device.type == "cpu" else 256)
        splits, k_per_split = _gemv_launch(m, n, k, x.device, block_n, block_k)
        partial = torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
        _nf4_gemv_split_kernel[(triton.cdiv(n, block_n), splits)](
            partial, x_compute, x_compute.stride(0), *storage, m, n, k, k_per_split,
            NESTED=weight.nested, EVEN_K=even_k, FP32_DOT=fp32_dot, BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_K=block_k, enable_fp_fusion=False,
        )
        _nf4_gemv_reduce_kernel[(triton.cdiv(n, block_n),)](
            out, out.stride(0), partial, splits, bias_compute, lora_h, lora_b_c, rank, float(scale), dora_scale, m, n,
            BLOCK_M=block_m, BLOCK_N=block_n, enable_fp_fusion=False, **epilogue_flags,
        )
        return out
    block_m = block_m or (64 if m >= 64 else max(16, _next_power_of_2(m)))
    block_n = block_n or 64
    block_k = block_k or 64
    _nf4_linear_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
        out, out.stride(0), x_compute, x_compute.stride(0), *storage, bias_compute, lora_h, lora_b_c, rank,
        float(scale), dora_scale, m, n, k,
        NESTED=weight.nested, EVEN_K=even_k, FP32_DOT=fp32_dot, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        enable_fp_fusion=False, **epilogue_flags,
    )
    return out
