"""Triton GEMM for the randomized AWSVD route, with the activation scaling folded into the loads.

    out[b, i, j] = Σ_k a[b, i, k] · s[b, k] · x[b, k, j]          (s optional: s ≡ 1)

Shapes: a [M, K] or [B, M, K] with any strides (``Wᵀ`` is passed as a transposed view, never
copied), x [K, N] / [B, K, N] float32 (the thin sketch), s [K] (shared) or [B, K] float32,
out [M, N] / [B, M, N] float32. The weight ``a`` is read in its own dtype (float32, float16,
bfloat16): no float32 copy of a 16-bit W is made. For 16-bit ``a`` the scaled fp32 tile of x is
split into ``hi + lo`` halves in a's dtype, so both tensor-core products are exact and the sum
keeps ~fp32 accuracy of x; float32 ``a`` uses IEEE fp32 dots. Accumulation is fp32.
``lolakernels.compress.weighted_svd.TorchProducts`` (plain torch.matmul) is the oracle.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _next_power_of_2(value: int) -> int:
    return 1 << max(0, int(value) - 1).bit_length()


@triton.jit
def _scaled_matmul_kernel(
    out_ptr, a_ptr, x_ptr, scale_ptr,
    rows, columns, inner,
    stride_a_batch, stride_a_row, stride_a_inner,
    stride_x_batch, stride_x_inner, stride_x_column,
    stride_out_batch, stride_out_row, stride_out_column,
    stride_scale_batch,
    HAS_SCALE: tl.constexpr, SPLIT_X: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One BLOCK_M × BLOCK_N tile of out for one matrix of the batch (program_id(2))."""
    row_tile = tl.program_id(0)
    column_tile = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    row_index = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    column_index = column_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = row_index < rows
    column_mask = column_index < columns
    a_base = a_ptr + batch * stride_a_batch
    x_base = x_ptr + batch * stride_x_batch

    accumulator = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for inner_begin in range(0, inner, BLOCK_K):
        inner_index = inner_begin + tl.arange(0, BLOCK_K)
        inner_mask = inner_index < inner
        a_tile = tl.load(
            a_base + row_index[:, None].to(tl.int64) * stride_a_row
            + inner_index[None, :].to(tl.int64) * stride_a_inner,
            mask=row_mask[:, None] & inner_mask[None, :], other=0.0,
        )
        x_tile = tl.load(
            x_base + inner_index[:, None].to(tl.int64) * stride_x_inner + column_index[None, :] * stride_x_column,
            mask=inner_mask[:, None] & column_mask[None, :], other=0.0,
        ).to(tl.float32)
        if HAS_SCALE:
            # diag(s) applied to the thin operand as it is loaded: W·diag(s) is never formed.
            scale = tl.load(scale_ptr + batch * stride_scale_batch + inner_index, mask=inner_mask, other=0.0)
            x_tile = x_tile * scale[:, None]
        if SPLIT_X:
            x_hi = x_tile.to(a_ptr.dtype.element_ty)
            x_lo = (x_tile - x_hi.to(tl.float32)).to(a_ptr.dtype.element_ty)
            accumulator = tl.dot(a_tile, x_hi, accumulator)
            accumulator = tl.dot(a_tile, x_lo, accumulator)
        else:
            accumulator = tl.dot(a_tile, x_tile, accumulator, input_precision=DOT_PRECISION)

    out_pointers = (out_ptr + batch * stride_out_batch + row_index[:, None].to(tl.int64) * stride_out_row
                    + column_index[None, :] * stride_out_column)
    tl.store(out_pointers, accumulator, mask=row_mask[:, None] & column_mask[None, :])


def _batched(tensor: Tensor, name: str, dims: int) -> Tensor:
    if tensor.dim() == dims:
        return tensor.unsqueeze(0)
    if tensor.dim() != dims + 1:
        raise ValueError(f"{name} must be {dims}-D or batched {dims + 1}-D, got shape {list(tensor.shape)}")
    return tensor


def scaled_matmul(a: Tensor, x: Tensor, scale: Optional[Tensor] = None) -> Tensor:
    """``a · diag(scale) · x`` in float32 (see the module docstring for shapes and dtypes)."""
    if a.dtype not in TRITON_DTYPES:
        raise TypeError(f"a has dtype {a.dtype}; expected float32, float16 or bfloat16")
    if x.dtype != torch.float32:
        raise TypeError(f"x has dtype {x.dtype}; expected float32")
    batched = a.dim() == 3
    a3, x3 = _batched(a, "a", 2), _batched(x, "x", 2)
    batch, rows, inner = a3.shape
    if x.dim() != a.dim() or x3.shape[0] != batch or x3.shape[1] != inner:
        raise ValueError(f"x has shape {list(x.shape)}; expected [{inner}, N] (batched like a {list(a.shape)})")
    columns = x3.shape[-1]
    out = torch.empty(batch, rows, columns, dtype=torch.float32, device=a.device)
    if scale is not None:
        if scale.dtype != torch.float32 or tuple(scale.shape) not in ((inner,), (batch, inner)):
            raise ValueError(f"scale must be float32 [{inner}] or [B, {inner}], got {scale.dtype} {list(scale.shape)}")
        scale = scale.contiguous()
        stride_scale_batch = scale.stride(0) if scale.dim() == 2 else 0
    if rows == 0 or columns == 0:
        return out if batched else out[0]
    if inner == 0:
        return out.zero_() if batched else out[0].zero_()
    block_m = 64
    block_n = max(16, min(64, _next_power_of_2(columns)))
    block_k = 32
    grid = (triton.cdiv(rows, block_m), triton.cdiv(columns, block_n), batch)
    split = a.dtype != torch.float32
    _scaled_matmul_kernel[grid](
        out, a3, x3, scale if scale is not None else out,
        rows, columns, inner,
        a3.stride(0), a3.stride(1), a3.stride(2),
        x3.stride(0), x3.stride(1), x3.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        stride_scale_batch if scale is not None else 0,
        HAS_SCALE=scale is not None, SPLIT_X=split, DOT_PRECISION="ieee",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return out if batched else out[0]


class TritonProducts:
    """The randomized route's two products over W, reading W in its own dtype."""

    @staticmethod
    def scaled_times(weight: Tensor, scale: Tensor, thin: Tensor) -> Tensor:
        """``W · diag(d) · X``: ``[..., m, n], [..., n], [..., n, l] → [..., m, l]``."""
        return scaled_matmul(weight, thin, scale)

    @staticmethod
    def transpose_times(weight: Tensor, thin: Tensor) -> Tensor:
        """``Wᵀ · Q``: ``[..., m, n], [..., m, l] → [..., n, l]``."""
        return scaled_matmul(weight.mT, thin)
