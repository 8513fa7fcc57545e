"""Pure-PyTorch oracle for the nf4 family: bitsandbytes' 4-bit storage read as is, and the linear
layer bitsandbytes' ``Linear4bit`` + PEFT's LoRA / DoRA compute on it.

Storage (checked against bitsandbytes 0.50.2, docs/design.md §4): ``W[N, K]`` flattened row-major is cut
into blocks of ``blocksize`` over the flat index; element ``j`` is the code index in byte ``j // 2``
(high nibble for even ``j``) and

    W[j] = dtype(NF4_CODE[index_j] * absmax[j // blocksize])          (fp32 product, one rounding)
    absmax[b] = code2[q[b]] * absmax2[b // blocksize2] + offset       (double quantization)

The linear layer, for x [M, K], lora_a [r, K], lora_b [N, r], with compute dtype C (bitsandbytes'
``compute_dtype``), lora dtype L (PEFT keeps adapters in fp32) and x's dtype X:

    base   = X( C( x_C · W_Cᵀ + bias_C ) )                 W_C: dequantized straight to C
    t      = (x_L · lora_aᵀ) · lora_bᵀ                     in L (x_L: dropout(x) in L)
    LoRA:  y = X( base + X(t · scale) )
    DoRA:  s = magnitude / ‖W_S,L + scale · lora_b lora_a‖_row      (W_S: dequantized to the state's dtype)
           y = X( base + ((s − 1) · (base − bias) + (s · t) · scale) )

which is the rounding sequence of ``Linear4bit.forward`` (``gemm_4bit``: dequantize to A's dtype,
then ``F.linear``) followed by ``peft.tuners.lora.bnb.Linear4bit.forward``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

NF4_CODE_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
STATE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Rows of W dequantized at a time wherever a whole weight would otherwise be materialized.
TILE_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class Nf4Weight:
    """A bitsandbytes nf4 weight as plain tensors (see :func:`lolakernels.ops.nf4.read_nf4`)."""

    packed: Tensor                  # uint8 [(numel + 1) // 2]
    shape: tuple[int, ...]
    blocksize: int
    dtype: torch.dtype              # the state's dtype (what dequantize_4bit returns)
    absmax: Optional[Tensor]        # fp32 [blocks], when not double-quantized
    absmax_q: Optional[Tensor]      # uint8 [blocks]
    absmax_code: Optional[Tensor]   # fp32 [256]
    absmax_scale: Optional[Tensor]  # fp32 [ceil(blocks / absmax_blocksize)]
    absmax_offset: Optional[Tensor]  # fp32 scalar
    absmax_blocksize: int

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count

    @property
    def nested(self) -> bool:
        return self.absmax is None


def block_absmax(weight: Nf4Weight) -> Tensor:
    """fp32 absmax of every block (decoding the double quantization)."""
    if weight.absmax is not None:
        return weight.absmax
    blocks = weight.absmax_q.numel()
    scale = weight.absmax_scale.repeat_interleave(weight.absmax_blocksize)[:blocks]
    return weight.absmax_code[weight.absmax_q.long()] * scale + weight.absmax_offset


def dequantize_range(weight: Nf4Weight, begin: int, count: int, dtype: torch.dtype) -> Tensor:
    """Flat elements [begin, begin + count) of W in ``dtype``, bit for bit as bitsandbytes."""
    device = weight.packed.device
    j = torch.arange(begin, begin + count, device=device)
    byte = weight.packed[j // 2].to(torch.int32)
    index = torch.where(j % 2 == 0, byte >> 4, byte & 15)
    code = torch.tensor(NF4_CODE_VALUES, dtype=torch.float32, device=device)
    absmax = block_absmax(weight)
    return (code[index] * absmax[j // weight.blocksize]).to(dtype)


def nf4_dequantize(weight: Nf4Weight, dtype: torch.dtype) -> Tensor:
    """The whole weight in ``dtype``, shaped like the original tensor."""
    return dequantize_range(weight, 0, weight.numel, dtype).reshape(weight.shape)


def dequantize_rows(weight: Nf4Weight, row0: int, rows: int, dtype: torch.dtype) -> Tensor:
    """Rows [row0, row0 + rows) of the 2-D weight in ``dtype``."""
    k = weight.shape[1]
    return dequantize_range(weight, row0 * k, rows * k, dtype).reshape(rows, k)


def row_tiles(weight: Nf4Weight):
    """(row0, rows) tiles of about TILE_ELEMENTS elements covering the 2-D weight."""
    n, k = weight.shape
    step = max(1, TILE_ELEMENTS // max(k, 1))
    for row0 in range(0, n, step):
        yield row0, min(step, n - row0)


def lora_term(x_lora: Tensor, lora_a: Tensor, lora_b: Tensor) -> Tensor:
    """t = (x_L · lora_aᵀ) · lora_bᵀ in the adapter's dtype, as PEFT's lora_B(lora_A(x))."""
    return F.linear(F.linear(x_lora, lora_a), lora_b)


def dora_weight_norm(weight: Nf4Weight, lora_a: Tensor, lora_b: Tensor, scale: float, dequantize_rows_fn=None) -> Tensor:
    """‖W + scale · lora_b lora_a‖ per output row, as PEFT's DoraLinearLayer.get_weight_norm on a
    bitsandbytes weight: W dequantized to the state's dtype, then cast to the adapter's dtype.
    Computed tile by tile (the dense product and the dequantized weight are never whole)."""
    rows_of = dequantize_rows_fn or dequantize_rows
    dtype = lora_a.dtype
    norms = []
    for row0, rows in row_tiles(weight):
        tile = rows_of(weight, row0, rows, weight.dtype).to(dtype)
        lora_weight = (lora_b[row0:row0 + rows] @ lora_a).to(dtype)
        norms.append(torch.linalg.norm(tile + scale * lora_weight, dim=1).to(dtype))
    if not norms:
        return lora_a.new_empty(0)
    return torch.cat(norms)


def base_linear(x: Tensor, weight: Nf4Weight, compute_dtype: torch.dtype, bias: Optional[Tensor]) -> Tensor:
    """bitsandbytes' Linear4bit output in x's dtype: F.linear in the compute dtype on W dequantized
    straight to it (``gemm_4bit``'s default implementation)."""
    w = nf4_dequantize(weight, compute_dtype)
    b = None if bias is None else bias.to(compute_dtype)
    return F.linear(x.to(compute_dtype), w, b).to(x.dtype)


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
) -> Tensor:
    """y [M, N] in x's dtype (module docstring). ``x_lora`` is the adapter's input (x cast to
    lora_a's dtype, after dropout); ``weight_norm`` the detached DoRA norm."""
    result = base_linear(x, weight, compute_dtype, bias)
    if lora_a is None:
        return result
    if x_lora is None:
        x_lora = x.to(lora_a.dtype)
    t = lora_term(x_lora, lora_a, lora_b)
    if magnitude is None:
        return result + (t * scale).to(result.dtype)
    s = magnitude / weight_norm
    base = result if bias is None else result - bias.to(compute_dtype)
    dora = (s - 1) * base + s * t * scale
    return (result + dora).to(result.dtype)


def nf4_lora_linear_dropout_dora(
    x: Tensor,
    weight: Nf4Weight,
    compute_dtype: torch.dtype,
    x_lora: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    bias: Optional[Tensor],
    magnitude: Tensor,
    weight_norm: Tensor,
) -> Tensor:
    """PEFT's DoRA in training with dropout: the DoRA base is recomputed on the dropped-out input
    with W in the state's dtype cast to the adapter's: y = X(base(x) + (s − 1)·(x_L·W_Lᵀ) + (s·t)·scale)."""
    result = base_linear(x, weight, compute_dtype, bias)
    w = nf4_dequantize(weight, weight.dtype).to(lora_a.dtype)
    s = magnitude / weight_norm
    dora = (s - 1) * F.linear(x_lora, w) + s * lora_term(x_lora, lora_a, lora_b) * scale
    return (result + dora).to(result.dtype)
