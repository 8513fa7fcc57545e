"""Triton backend of the shared-basis / multi-LoRA forward: ``out[:, o:o+d_out] += term``.

For each token ``t`` whose adapter ``a = ids[t]`` is not ``-1``, with cluster
``c = basis_of[a]``, multiplier ``s = scale * adapter_scale[a]`` (``adapter_scale``
optional) and true rank ``r_a = ranks[a]`` (optional, else ``R``):

    h = lora_a[c] @ x[t]                       h:  [R]      (h[k] = 0 for k >= r_a)
    g = s * sigma_a(h)                         g:  [R]      (g[j] = 0 for j >= r_a)
        sigma_a(h) = h | sigma[a] * h | sigma[a] @ h      (None | [N, R] | [N, R, R])
    out[t, out_offset : out_offset + d_out] += lora_b[c] @ g

Shapes: x [T, d_in] (unit column stride), lora_a [C, R, d_in], lora_b [C, d_out, R],
sigma [N, R] or [N, R, R], ids [T] int32 in [-1, N), basis_of [N] int32 in [0, C),
adapter_scale [N] fp32, ranks [N] int32 in [0, R], out [T, out_cols] (unit column stride).
All products accumulate in fp32; ``out`` is loaded, the fp32 term added, and the sum is
rounded once into ``out``'s dtype. Rows of ``-1`` tokens are never written.
``lolakernels.reference.shared_basis_lora`` is the oracle this file is tested against.

Two paths, both free of host synchronisation (launch grids depend only on shapes, so the
op can be captured in a CUDA graph):

* prefill (many tokens): tokens are sorted by cluster on the device and cut into tiles of
  ``BLOCK_M`` tokens that share one ``lora_a[c]`` / ``lora_b[c]``; one fused kernel does
  shrink -> Sigma -> expand with the rank-R intermediate kept in registers.
* decode (few tokens): a split-K shrink kernel atomically adds fp32 partial ``h`` into a
  ``[T, R_pad]`` workspace, then an expand kernel applies Sigma and adds into ``out``.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Above this many tokens a tile of tokens sharing one cluster amortises the weight loads
# well enough for the fused kernel; below it the split-K decode path fills the GPU better.
PREFILL_MIN_TOKENS = 65

SIGMA_NONE, SIGMA_DIAG, SIGMA_FULL = 0, 1, 2

# Per-program register budget (fp32 elements) for the [rows, j, k] tile of the full-Sigma
# matvec; larger ranks are processed in chunks of j so the tile never spills badly.
_SIGMA_TILE_ELEMENTS = 8192


def _next_power_of_2(value: int) -> int:
    return 1 << max(0, int(value) - 1).bit_length()


def _padded_rank(rank: int) -> int:
    # tl.arange needs powers of two and tl.dot needs every dimension >= 16.
    return max(16, _next_power_of_2(rank))


@functools.lru_cache(maxsize=None)
def _cuda_multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    """How many programs a launch should expose to keep every SM busy."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return 4 * _cuda_multiprocessors(index)
    # The interpreter runs programs one after another: few, larger programs are fastest.
    return 4


def _sigma_mode(sigma: Optional[Tensor]) -> int:
    if sigma is None:
        return SIGMA_NONE
    return SIGMA_DIAG if sigma.dim() == 2 else SIGMA_FULL


@triton.jit
def _fused_prefill_kernel(
    out_ptr, x_ptr, lora_a_ptr, lora_b_ptr, sigma_ptr, ids_ptr, adapter_scale_ptr, ranks_ptr,
    token_order_ptr, tile_cluster_ptr, tile_begin_ptr, tile_end_ptr,
    stride_x_token, stride_out_token, out_offset, d_in, d_out, rank, scale,
    output_tiles, output_tiles_per_program,
    SIGMA_MODE: tl.constexpr, HAS_ADAPTER_SCALE: tl.constexpr, HAS_RANKS: tl.constexpr,
    SPLIT_G: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    RANK_PAD: tl.constexpr, SIGMA_J_BLOCK: tl.constexpr,
):
    """One tile of <= BLOCK_M same-cluster tokens x a run of BLOCK_N-wide output tiles.

    token_order lists token indices sorted by cluster; tile ``i`` covers
    ``token_order[tile_begin[i]:tile_end[i]]``, all of cluster ``tile_cluster[i]``.
    Tiles past the real tile count have ``begin == end`` and exit at once.
    """
    tile = tl.program_id(0)
    output_chunk = tl.program_id(1)
    row_begin = tl.load(tile_begin_ptr + tile)
    row_end = tl.load(tile_end_ptr + tile)
    if row_begin >= row_end:
        return
    first_output_tile = output_chunk * output_tiles_per_program
    last_output_tile = tl.minimum(first_output_tile + output_tiles_per_program, output_tiles)
    if first_output_tile >= last_output_tile:
        return
    cluster = tl.load(tile_cluster_ptr + tile).to(tl.int64)

    rows = row_begin + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    tokens = tl.load(token_order_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    adapters = tl.load(ids_ptr + tokens, mask=row_mask, other=0).to(tl.int64)
    rank_index = tl.arange(0, RANK_PAD)

    # Shrink: h[m, r] = sum_k x[token_m, k] * lora_a[c, r, k], fp32 accumulation.
    lora_a_cluster = lora_a_ptr + cluster * rank * d_in
    h = tl.zeros([BLOCK_M, RANK_PAD], dtype=tl.float32)
    for k_begin in range(0, d_in, BLOCK_K):
        k_index = k_begin + tl.arange(0, BLOCK_K)
        k_mask = k_index < d_in
        x_tile = tl.load(
            x_ptr + tokens[:, None] * stride_x_token + k_index[None, :],
            mask=row_mask[:, None] & k_mask[None, :], other=0.0,
        )
        lora_a_tile = tl.load(
            lora_a_cluster + rank_index[None, :] * d_in + k_index[:, None],
            mask=(rank_index[None, :] < rank) & k_mask[:, None], other=0.0,
        )
        h = tl.dot(x_tile, lora_a_tile, h, input_precision=DOT_PRECISION)

    if HAS_RANKS:
        true_rank = tl.load(ranks_ptr + adapters, mask=row_mask, other=0)
        rank_mask = rank_index[None, :] < true_rank[:, None]
        h = tl.where(rank_mask, h, 0.0)

    if SIGMA_MODE == 1:  # SIGMA_DIAG
        sigma_diag = tl.load(
            sigma_ptr + adapters[:, None] * rank + rank_index[None, :],
            mask=row_mask[:, None] & (rank_index[None, :] < rank), other=0.0,
        ).to(tl.float32)
        g = sigma_diag * h
    elif SIGMA_MODE == 2:  # SIGMA_FULL
        # Per-token matvec g[m, j] = sum_k sigma[a_m, j, k] h[m, k] on a 3-D tile, in
        # chunks of SIGMA_J_BLOCK values of j; each chunk is placed into g through a
        # one-hot select (register tensors cannot be written by slice).
        sigma_rows = sigma_ptr + adapters[:, None, None] * rank * rank
        k_valid = (rank_index < rank)[None, None, :]
        if SIGMA_J_BLOCK == RANK_PAD:
            sigma_tile = tl.load(
                sigma_rows + rank_index[None, :, None] * rank + rank_index[None, None, :],
                mask=row_mask[:, None, None] & (rank_index < rank)[None, :, None] & k_valid,
                other=0.0,
            ).to(tl.float32)
            g = tl.sum(h[:, None, :] * sigma_tile, axis=2)
        else:
            g = tl.zeros([BLOCK_M, RANK_PAD], dtype=tl.float32)
            j_offsets = tl.arange(0, SIGMA_J_BLOCK)
            for j_begin in range(0, RANK_PAD, SIGMA_J_BLOCK):
                j_index = j_begin + j_offsets
                sigma_tile = tl.load(
                    sigma_rows + j_index[None, :, None] * rank + rank_index[None, None, :],
                    mask=row_mask[:, None, None] & (j_index < rank)[None, :, None] & k_valid,
                    other=0.0,
                ).to(tl.float32)
                g_chunk = tl.sum(h[:, None, :] * sigma_tile, axis=2)
                is_slot = (j_index[:, None] == rank_index[None, :])[None, :, :]
                g += tl.sum(tl.where(is_slot, g_chunk[:, :, None], 0.0), axis=1)
    else:
        g = h

    if HAS_ADAPTER_SCALE:
        token_scale = scale * tl.load(adapter_scale_ptr + adapters, mask=row_mask, other=0.0)
        g = g * token_scale[:, None]
    else:
        g = g * scale
    if HAS_RANKS:
        g = tl.where(rank_mask, g, 0.0)

    # Expand on tensor cores needs g in the weights' dtype; for 16-bit weights g is split
    # into hi + lo halves so the product keeps ~fp32 accuracy of g and out is still rounded
    # only once.
    g_hi = g.to(lora_b_ptr.dtype.element_ty)
    if SPLIT_G:
        g_lo = (g - g_hi.to(tl.float32)).to(lora_b_ptr.dtype.element_ty)

    lora_b_cluster = lora_b_ptr + cluster * d_out * rank
    out_rows = out_ptr + tokens[:, None] * stride_out_token + out_offset
    for output_tile in range(first_output_tile, last_output_tile):
        columns = output_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        column_mask = columns < d_out
        lora_b_tile = tl.load(
            lora_b_cluster + columns[None, :] * rank + rank_index[:, None],
            mask=column_mask[None, :] & (rank_index[:, None] < rank), other=0.0,
        )
        term = tl.dot(g_hi, lora_b_tile, input_precision=DOT_PRECISION)
        if SPLIT_G:
            term = tl.dot(g_lo, lora_b_tile, term, input_precision=DOT_PRECISION)
        out_mask = row_mask[:, None] & column_mask[None, :]
        out_tile = tl.load(out_rows + columns[None, :], mask=out_mask, other=0.0)
        updated = out_tile.to(tl.float32) + term
        tl.store(out_rows + columns[None, :], updated.to(out_tile.dtype), mask=out_mask)


@triton.jit
def _decode_shrink_kernel(
    h_ptr, x_ptr, lora_a_ptr, ids_ptr, basis_of_ptr, ranks_ptr,
    stride_x_token, d_in, rank, k_per_split,
    HAS_RANKS: tl.constexpr, BLOCK_K: tl.constexpr, RANK_PAD: tl.constexpr,
):
    """h[t, :] += lora_a[c] [:, ks] @ x[t, ks] for one token and one d_in split (fp32 atomics)."""
    token = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    adapter = tl.load(ids_ptr + token).to(tl.int64)
    if adapter < 0:
        return
    cluster = tl.load(basis_of_ptr + adapter).to(tl.int64)
    rank_limit = rank
    if HAS_RANKS:
        rank_limit = tl.minimum(tl.load(ranks_ptr + adapter), rank)
    rank_index = tl.arange(0, RANK_PAD)
    # Rows past the true rank are never read: they stay zero, as the contract requires.
    rank_mask = rank_index < rank_limit

    k_first = split * k_per_split
    k_last = tl.minimum(k_first + k_per_split, d_in)
    lora_a_cluster = lora_a_ptr + cluster * rank * d_in
    # Elementwise products summed once at the end: one reduction per program, not per step.
    partial = tl.zeros([RANK_PAD, BLOCK_K], dtype=tl.float32)
    for k_begin in range(k_first, k_last, BLOCK_K):
        k_index = k_begin + tl.arange(0, BLOCK_K)
        k_mask = k_index < k_last
        x_chunk = tl.load(x_ptr + token * stride_x_token + k_index, mask=k_mask, other=0.0)
        lora_a_tile = tl.load(
            lora_a_cluster + rank_index[:, None] * d_in + k_index[None, :],
            mask=rank_mask[:, None] & k_mask[None, :], other=0.0,
        )
        partial += lora_a_tile.to(tl.float32) * x_chunk.to(tl.float32)[None, :]
    h_partial = tl.sum(partial, axis=1)
    # Relaxed ordering suffices: the partial sums are only read by the next kernel launch.
    tl.atomic_add(h_ptr + token * RANK_PAD + rank_index, h_partial, mask=rank_mask, sem="relaxed")


@triton.jit
def _decode_expand_kernel(
    out_ptr, h_ptr, lora_b_ptr, sigma_ptr, ids_ptr, basis_of_ptr, adapter_scale_ptr, ranks_ptr,
    stride_out_token, out_offset, d_out, rank, scale, output_tiles, output_tiles_per_program,
    SIGMA_MODE: tl.constexpr, HAS_ADAPTER_SCALE: tl.constexpr, HAS_RANKS: tl.constexpr,
    BLOCK_N: tl.constexpr, RANK_PAD: tl.constexpr, SIGMA_J_BLOCK: tl.constexpr,
):
    """out[t, cols] += lora_b[c][cols] @ (s * sigma_a(h[t])) for one token and a run of output tiles."""
    token = tl.program_id(0).to(tl.int64)
    output_chunk = tl.program_id(1)
    adapter = tl.load(ids_ptr + token).to(tl.int64)
    if adapter < 0:
        return
    first_output_tile = output_chunk * output_tiles_per_program
    last_output_tile = tl.minimum(first_output_tile + output_tiles_per_program, output_tiles)
    if first_output_tile >= last_output_tile:
        return
    cluster = tl.load(basis_of_ptr + adapter).to(tl.int64)
    rank_limit = rank
    if HAS_RANKS:
        rank_limit = tl.minimum(tl.load(ranks_ptr + adapter), rank)
    rank_index = tl.arange(0, RANK_PAD)
    rank_mask = rank_index < rank_limit

    # Entries past the true rank are not read, so h[k] = 0 for k >= r_a.
    h = tl.load(h_ptr + token * RANK_PAD + rank_index, mask=rank_mask, other=0.0)
    if SIGMA_MODE == 1:  # SIGMA_DIAG
        sigma_diag = tl.load(sigma_ptr + adapter * rank + rank_index, mask=rank_index < rank, other=0.0)
        g = sigma_diag.to(tl.float32) * h
    elif SIGMA_MODE == 2:  # SIGMA_FULL
        sigma_rows = sigma_ptr + adapter * rank * rank
        k_valid = (rank_index < rank)[None, :]
        if SIGMA_J_BLOCK == RANK_PAD:
            sigma_tile = tl.load(
                sigma_rows + rank_index[:, None] * rank + rank_index[None, :],
                mask=(rank_index < rank)[:, None] & k_valid, other=0.0,
            ).to(tl.float32)
            g = tl.sum(sigma_tile * h[None, :], axis=1)
        else:
            g = tl.zeros([RANK_PAD], dtype=tl.float32)
            j_offsets = tl.arange(0, SIGMA_J_BLOCK)
            for j_begin in range(0, RANK_PAD, SIGMA_J_BLOCK):
                j_index = j_begin + j_offsets
                sigma_tile = tl.load(
                    sigma_rows + j_index[:, None] * rank + rank_index[None, :],
                    mask=(j_index < rank)[:, None] & k_valid, other=0.0,
                ).to(tl.float32)
                g_chunk = tl.sum(sigma_tile * h[None, :], axis=1)
                is_slot = j_index[:, None] == rank_index[None, :]
                g += tl.sum(tl.where(is_slot, g_chunk[:, None], 0.0), axis=0)
    else:
        g = h
    if HAS_ADAPTER_SCALE:
        g = g * (scale * tl.load(adapter_scale_ptr + adapter))
    else:
        g = g * scale

    lora_b_cluster = lora_b_ptr + cluster * d_out * rank
    out_row = out_ptr + token * stride_out_token + out_offset
    for output_tile in range(first_output_tile, last_output_tile):
        columns = output_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        column_mask = columns < d_out
        # Columns of lora_b past the true rank are never read: that is g[j] = 0 for j >= r_a.
        lora_b_tile = tl.load(
            lora_b_cluster + columns[:, None] * rank + rank_index[None, :],
            mask=column_mask[:, None] & rank_mask[None, :], other=0.0,
        )
        term = tl.sum(lora_b_tile.to(tl.float32) * g[None, :], axis=1)
        out_values = tl.load(out_row + columns, mask=column_mask, other=0.0)
        updated = out_values.to(tl.float32) + term
        tl.store(out_row + columns, updated.to(out_values.dtype), mask=column_mask)


def _cluster_tiles(ids: Tensor, basis_of: Tensor, clusters: int, block_m: int):
    """Sorts tokens by cluster and cuts each cluster's run into tiles of <= block_m tokens.

    Returns ``(token_order [T] int32, tile_cluster, tile_begin, tile_end)``, the last three
    ``[cdiv(T, block_m) + min(C, T)]`` int32 — an upper bound on the tile count that depends
    only on shapes, so nothing is read back to the host. Tokens of adapter ``-1`` get the
    sentinel cluster ``C``, sort to the end and belong to no tile; unused tiles are empty.
    """
    num_tokens = ids.shape[0]
    device = ids.device
    sentinel = torch.full_like(ids, clusters, dtype=torch.long)
    cluster_of_token = torch.where(ids >= 0, basis_of[ids.clamp(min=0).long()].long(), sentinel)
    sorted_cluster, token_order = torch.sort(cluster_of_token, stable=True)
    cluster_bounds = torch.searchsorted(sorted_cluster, torch.arange(clusters + 1, device=device))
    cluster_start, cluster_stop = cluster_bounds[:-1], cluster_bounds[1:]
    tiles_per_cluster = (cluster_stop - cluster_start + block_m - 1) // block_m
    tiles_through_cluster = torch.cumsum(tiles_per_cluster, 0)
    tiles_before_cluster = tiles_through_cluster - tiles_per_cluster

    max_tiles = triton.cdiv(num_tokens, block_m) + min(clusters, num_tokens)
    tile_index = torch.arange(max_tiles, device=device)
    tile_cluster = torch.searchsorted(tiles_through_cluster, tile_index, right=True)
    is_real = tile_cluster < clusters
    cluster_of_tile = tile_cluster.clamp(max=clusters - 1)
    tile_in_cluster = tile_index - tiles_before_cluster[cluster_of_tile]
    tile_begin = cluster_start[cluster_of_tile] + tile_in_cluster * block_m
    tile_end = torch.minimum(tile_begin + block_m, cluster_stop[cluster_of_tile])
    tile_begin = torch.where(is_real, tile_begin, 0)
    tile_end = torch.where(is_real, tile_end, 0)
    return (
        token_order.to(torch.int32),
        cluster_of_tile.to(torch.int32),
        tile_begin.to(torch.int32),
        tile_end.to(torch.int32),
    )


def _prefill_(
    out, out_offset, x, lora_a, lora_b, sigma, ids, basis_of, scale, adapter_scale, ranks,
    *, block_m: Optional[int] = None, block_n: Optional[int] = None, block_k: Optional[int] = None,
    output_tiles_per_program: Optional[int] = None,
) -> None:
    """Fused prefill path; the keyword overrides exist for tests and tuning."""
    num_tokens, d_in = x.shape
    clusters, rank, _ = lora_a.shape
    d_out = lora_b.shape[1]
    if num_tokens == 0 or d_out == 0:
        return
    rank_pad = _padded_rank(rank)
    if block_m is None:
        tokens_per_cluster = triton.cdiv(num_tokens, min(clusters, num_tokens))
        block_m = min(64, max(16, _next_power_of_2(tokens_per_cluster)))
    if block_n is None:
        block_n = min(64, max(16, _next_power_of_2(d_out)))
    if block_k is None:
        block_k = min(64 if rank_pad <= 64 else 32, max(16, _next_power_of_2(d_in)))
    sigma_j_block = max(1, min(rank_pad, _SIGMA_TILE_ELEMENTS // (block_m * rank_pad)))

    token_order, tile_cluster, tile_begin, tile_end = _cluster_tiles(ids, basis_of, clusters, block_m)
    token_tiles = tile_begin.shape[0]
    output_tiles = triton.cdiv(d_out, block_n)
    if output_tiles_per_program is None:
        # Each program recomputes its tile's shrink once: give it as many output tiles as
        # the SM count allows, so the shrink is amortised yet every SM has work.
        output_chunks = min(output_tiles, max(1, triton.cdiv(_target_programs(x.device), token_tiles)))
        output_tiles_per_program = triton.cdiv(output_tiles, output_chunks)
    output_chunks = triton.cdiv(output_tiles, output_tiles_per_program)

    grid = (token_tiles, output_chunks)
    _fused_prefill_kernel[grid](
        out, x, lora_a, lora_b, sigma if sigma is not None else lora_a, ids,
        adapter_scale if adapter_scale is not None else lora_a, ranks if ranks is not None else ids,
        token_order, tile_cluster, tile_begin, tile_end,
        x.stride(0), out.stride(0), out_offset, d_in, d_out, rank, float(scale),
        output_tiles, output_tiles_per_program,
        SIGMA_MODE=_sigma_mode(sigma), HAS_ADAPTER_SCALE=adapter_scale is not None,
        HAS_RANKS=ranks is not None, SPLIT_G=lora_b.dtype != torch.float32,
        # fp32 operands must not be truncated to tf32; 16-bit operands keep the backend default.
        DOT_PRECISION="ieee" if lora_b.dtype == torch.float32 else None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, RANK_PAD=rank_pad, SIGMA_J_BLOCK=sigma_j_block,
    )


def _decode_(
    out, out_offset, x, lora_a, lora_b, sigma, ids, basis_of, scale, adapter_scale, ranks,
    *, block_k: Optional[int] = None, block_n: Optional[int] = None, k_splits: Optional[int] = None,
    output_tiles_per_program: Optional[int] = None,
) -> None:
    """Split-K shrink + expand path; the keyword overrides exist for tests and tuning."""
    num_tokens, d_in = x.shape
    rank = lora_a.shape[1]
    d_out = lora_b.shape[1]
    if num_tokens == 0 or d_out == 0:
        return
    rank_pad = _padded_rank(rank)
    target_programs = _target_programs(x.device)
    if block_k is None:
        # Few tokens: split d_in finely enough that the splits alone fill the GPU, within a
        # [R_pad, BLOCK_K] tile of about 4K elements.
        splits_wanted = triton.cdiv(target_programs, num_tokens)
        block_k = min(max(16, 4096 // rank_pad), max(16, _next_power_of_2(triton.cdiv(d_in, splits_wanted))))
    if block_n is None:
        block_n = min(max(16, 4096 // rank_pad), 128, max(16, _next_power_of_2(d_out)))
    sigma_j_block = max(1, min(rank_pad, 4096 // rank_pad))

    k_blocks = max(1, triton.cdiv(d_in, block_k))
    if k_splits is None:
        k_splits = min(k_blocks, max(1, triton.cdiv(target_programs, num_tokens)))
    k_per_split = triton.cdiv(k_blocks, k_splits) * block_k
    k_splits = max(1, triton.cdiv(d_in, k_per_split))

    h = torch.zeros(num_tokens, rank_pad, dtype=torch.float32, device=x.device)
    _decode_shrink_kernel[(num_tokens, k_splits)](
        h, x, lora_a, ids, basis_of, ranks if ranks is not None else ids,
        x.stride(0), d_in, rank, k_per_split,
        HAS_RANKS=ranks is not None, BLOCK_K=block_k, RANK_PAD=rank_pad,
    )

    output_tiles = triton.cdiv(d_out, block_n)
    if output_tiles_per_program is None:
        output_chunks = min(output_tiles, max(1, triton.cdiv(target_programs, num_tokens)))
        output_tiles_per_program = triton.cdiv(output_tiles, output_chunks)
    output_chunks = triton.cdiv(output_tiles, output_tiles_per_program)
    _decode_expand_kernel[(num_tokens, output_chunks)](
        out, h, lora_b, sigma if sigma is not None else lora_b, ids, basis_of,
        adapter_scale if adapter_scale is not None else h, ranks if ranks is not None else ids,
        out.stride(0), out_offset, d_out, rank, float(scale), output_tiles, output_tiles_per_program,
        SIGMA_MODE=_sigma_mode(sigma), HAS_ADAPTER_SCALE=adapter_scale is not None,
        HAS_RANKS=ranks is not None, BLOCK_N=block_n, RANK_PAD=rank_pad, SIGMA_J_BLOCK=sigma_j_block,
    )


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
    """Adds the LoRA term into ``out[:, out_offset : out_offset + d_out]`` in place (one rounding).

    Inputs are assumed validated by the caller (see the module docstring for shapes).
    Launches depend only on shapes: no host synchronisation, CUDA-graph capturable.
    """
    num_tokens = x.shape[0]
    if num_tokens == 0 or lora_b.shape[1] == 0 or lora_a.shape[1] == 0:
        return
    path = _prefill_ if num_tokens >= PREFILL_MIN_TOKENS else _decode_
    path(out, out_offset, x, lora_a, lora_b, sigma, ids, basis_of, scale, adapter_scale, ranks)
