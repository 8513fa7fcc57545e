"""Pure-PyTorch oracle for the shared-basis / multi-LoRA family (fp32 math).

This file is the contract every backend implements. For each token ``t`` whose adapter
``a = ids[t]`` is not ``-1``, with cluster ``c = basis_of[a]``, multiplier
``s = scale * adapter_scale[a]`` (``adapter_scale`` optional) and true rank
``r_a = ranks[a]`` (optional, else ``R``):

    h = lora_a[c] @ x[t]                       h:  [R]      (h[k] = 0 for k >= r_a)
    g = s * sigma_a(h)                         g:  [R]      (g[j] = 0 for j >= r_a)
        sigma_a(h) = h                         (sigma is None: plain multi-LoRA)
                   = sigma[a] * h              (sigma [N, R], JD-Diag)
                   = sigma[a] @ h              (sigma [N, R, R], JD-Full)
    out[t, out_offset : out_offset + d_out] += lora_b[c] @ g

Shapes: x [T, d_in], lora_a [C, R, d_in], lora_b [C, d_out, R], ids [T] int32,
basis_of [N] int32 in [0, C), adapter_scale [N] fp32, ranks [N] int32 in [0, R].
Everything is accumulated in fp32; ``out`` is read, added to in fp32 and rounded once.
Tokens with ``ids[t] == -1`` leave their row of ``out`` untouched.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _rank_mask(ranks: Optional[Tensor], adapter: Tensor, rank: int) -> Optional[Tensor]:
    """[n, R] bool mask keeping the first ranks[adapter] entries, or None when ranks is absent.
    Applied with where, not a product, so non-finite values past a rank do not leak in as 0 · inf."""
    if ranks is None:
        return None
    positions = torch.arange(rank, device=adapter.device)
    return positions[None, :] < ranks[adapter].long()[:, None]


def _apply_sigma(sigma: Optional[Tensor], adapter: Tensor, h: Tensor) -> Tensor:
    if sigma is None:
        return h
    if sigma.dim() == 2:
        return sigma[adapter].float() * h
    return torch.bmm(sigma[adapter].float(), h.unsqueeze(-1)).squeeze(-1)


def _token_scale(scale: float, adapter_scale: Optional[Tensor], adapter: Tensor) -> Tensor:
    if adapter_scale is None:
        return torch.full((adapter.numel(), 1), float(scale), device=adapter.device)
    return (float(scale) * adapter_scale[adapter].float()).unsqueeze(-1)


def lora_term(
    x: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    sigma: Optional[Tensor],
    ids: Tensor,
    basis_of: Tensor,
    scale: float,
    adapter_scale: Optional[Tensor],
    ranks: Optional[Tensor],
) -> Tensor:
    """The LoRA term ``[T, d_out]`` in fp32 (rows of ``-1`` tokens are zero)."""
    num_tokens = x.shape[0]
    rank = lora_a.shape[1]
    d_out = lora_b.shape[1]
    term = torch.zeros(num_tokens, d_out, dtype=torch.float32, device=x.device)
    tokens = (ids >= 0).nonzero().squeeze(-1)
    if tokens.numel() == 0:
        return term
    adapter = ids[tokens].long()
    cluster = basis_of[adapter].long()
    # One dense product per cluster present in the batch: the reference favours clarity.
    h = torch.empty(tokens.numel(), rank, dtype=torch.float32, device=x.device)
    for c in torch.unique(cluster).tolist():
        rows = (cluster == c).nonzero().squeeze(-1)
        h[rows] = x[tokens[rows]].float() @ lora_a[c].float().t()
    mask = _rank_mask(ranks, adapter, rank)
    if mask is not None:
        h = torch.where(mask, h, 0.0)
    g = _token_scale(scale, adapter_scale, adapter) * _apply_sigma(sigma, adapter, h)
    if mask is not None:
        g = torch.where(mask, g, 0.0)
    for c in torch.unique(cluster).tolist():
        rows = (cluster == c).nonzero().squeeze(-1)
        term[tokens[rows]] = g[rows] @ lora_b[c].float().t()
    return term


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
    """Adds the LoRA term into ``out[:, out_offset : out_offset + d_out]`` (one rounding)."""
    term = lora_term(x, lora_a, lora_b, sigma, ids, basis_of, scale, adapter_scale, ranks)
    target = out.narrow(1, out_offset, lora_b.shape[1])
    # fp32 other operand: the sum is formed in fp32 and rounded once into out's dtype.
    target.copy_(target.float() + term)


def shared_basis_lora_backward(
    grad_term: Tensor,
    x: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    sigma: Optional[Tensor],
    ids: Tensor,
    basis_of: Tensor,
    scale: float,
    adapter_scale: Optional[Tensor],
    ranks: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Gradients of ``lora_term`` w.r.t. (x, lora_a, lora_b, sigma), each in its input's dtype.

    With dy = grad_term[t]:  dg = lora_b[c]ᵀ dy,  d lora_b[c] += dy gᵀ,
    dh = s · sigma_aᵀ(dg),  d sigma[a] += s · dg hᵀ (full) or s · dg ⊙ h (diag),
    d lora_a[c] += dh x[t]ᵀ,  dx[t] = lora_a[c]ᵀ dh.
    """
    rank = lora_a.shape[1]
    grad_x = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    grad_a = torch.zeros(lora_a.shape, dtype=torch.float32, device=x.device)
    grad_b = torch.zeros(lora_b.shape, dtype=torch.float32, device=x.device)
    grad_sigma = None if sigma is None else torch.zeros(sigma.shape, dtype=torch.float32, device=x.device)
    tokens = (ids >= 0).nonzero().squeeze(-1)
    if tokens.numel() > 0:
        adapter = ids[tokens].long()
        cluster = basis_of[adapter].long()
        xs = x[tokens].float()
        dy = grad_term[tokens].float()
        a_rows = lora_a[cluster].float()  # [n, R, d_in]
        b_rows = lora_b[cluster].float()  # [n, d_out, R]
        mask = _rank_mask(ranks, adapter, rank)
        h = torch.bmm(a_rows, xs.unsqueeze(-1)).squeeze(-1)
        if mask is not None:
            h = torch.where(mask, h, 0.0)
        s = _token_scale(scale, adapter_scale, adapter)
        g = s * _apply_sigma(sigma, adapter, h)
        if mask is not None:
            g = torch.where(mask, g, 0.0)
        dg = torch.bmm(b_rows.transpose(1, 2), dy.unsqueeze(-1)).squeeze(-1)
        if mask is not None:
            dg = torch.where(mask, dg, 0.0)
        grad_b.index_add_(0, cluster, dy.unsqueeze(-1) * g.unsqueeze(1))
        if sigma is None:
            dh = s * dg
        elif sigma.dim() == 2:
            dh = s * sigma[adapter].float() * dg
            grad_sigma.index_add_(0, adapter, s * dg * h)
        else:
            dh = s * torch.bmm(sigma[adapter].float().transpose(1, 2), dg.unsqueeze(-1)).squeeze(-1)
            grad_sigma.index_add_(0, adapter, s.unsqueeze(-1) * dg.unsqueeze(-1) * h.unsqueeze(1))
        if mask is not None:
            dh = torch.where(mask, dh, 0.0)
        grad_a.index_add_(0, cluster, dh.unsqueeze(-1) * xs.unsqueeze(1))
        grad_x[tokens] = torch.bmm(a_rows.transpose(1, 2), dh.unsqueeze(-1)).squeeze(-1)
    return (
        grad_x.to(x.dtype),
        grad_a.to(lora_a.dtype),
        grad_b.to(lora_b.dtype),
        None if grad_sigma is None else grad_sigma.to(sigma.dtype),
    )
