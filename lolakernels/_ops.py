"""Every lolakernels op schema in one place (torch.library), with its fake implementation and
autograd. Kernels run through the backend chosen by ``_backends.select``.

Ops:
  lolakernels::shared_basis_lora(x, lora_a, lora_b, sigma?, ids, basis_of, scale, adapter_scale?,
                                 ranks?, validate) -> Tensor        the LoRA term [T, d_out]
  lolakernels::shared_basis_lora_(out!, out_offset, x, ...) -> ()   adds the term into out in place
  lolakernels::shared_basis_lora_backward(grad, x, ...) -> (dx, d_lora_a, d_lora_b, d_sigma)
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import _backends
from ._checks import (
    require_contiguous,
    require_dims,
    require_dtype,
    require_in_range,
    require_same_device,
    require_size,
    require_unit_inner_stride,
)
from .reference.shared_basis_lora import shared_basis_lora_backward

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_shared_basis_args(
    x: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    sigma: Optional[Tensor],
    ids: Tensor,
    basis_of: Tensor,
    scale: float,
    adapter_scale: Optional[Tensor],
    ranks: Optional[Tensor],
    out: Optional[Tensor] = None,
    out_offset: int = 0,
) -> None:
    """Shape, dtype, device and layout checks; reads no tensor data (safe under tracing)."""
    require_dims("x", x, 2, "[T, d_in]")
    require_dims("lora_a", lora_a, 3, "[C, R, d_in]")
    require_dims("lora_b", lora_b, 3, "[C, d_out, R]")
    require_dims("ids", ids, 1, "[T]")
    require_dims("basis_of", basis_of, 1, "[N]")
    num_tokens, d_in = x.shape
    num_clusters, rank, _ = lora_a.shape
    num_adapters = basis_of.shape[0]
    require_size("lora_a", lora_a, 2, d_in, "x's d_in (x.shape[1])")
    require_size("lora_b", lora_b, 0, num_clusters, "the number of bases C (lora_a.shape[0])")
    require_size("lora_b", lora_b, 2, rank, "the rank R (lora_a.shape[1])")
    require_size("ids", ids, 0, num_tokens, "the number of tokens T (x.shape[0])")
    if sigma is not None:
        if sigma.dim() not in (2, 3):
            raise ValueError(f"sigma must be [N, R] (diagonal) or [N, R, R] (full), got shape {list(sigma.shape)}")
        require_size("sigma", sigma, 0, num_adapters, "the number of adapters N (basis_of.shape[0])")
        for dim in range(1, sigma.dim()):
            require_size("sigma", sigma, dim, rank, "the rank R (lora_a.shape[1])")
    if adapter_scale is not None:
        require_dims("adapter_scale", adapter_scale, 1, "[N]")
        require_size("adapter_scale", adapter_scale, 0, num_adapters, "the number of adapters N")
        require_dtype("adapter_scale", adapter_scale, (torch.float32,))
    if ranks is not None:
        require_dims("ranks", ranks, 1, "[N]")
        require_size("ranks", ranks, 0, num_adapters, "the number of adapters N")
        require_dtype("ranks", ranks, (torch.int32,))
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float, got {scale!r}")
    require_dtype("x", x, FLOAT_DTYPES)
    for name, tensor in (("lora_a", lora_a), ("lora_b", lora_b), ("sigma", sigma), ("out", out)):
        if tensor is not None:
            require_dtype(name, tensor, (x.dtype,), " (the dtype of x: all float tensors share one dtype)")
    require_dtype("ids", ids, (torch.int32,), " (convert once with .int())")
    require_dtype("basis_of", basis_of, (torch.int32,), " (convert once with .int())")
    require_same_device(dict(x=x, lora_a=lora_a, lora_b=lora_b, sigma=sigma, ids=ids, basis_of=basis_of,
                             adapter_scale=adapter_scale, ranks=ranks, out=out))
    require_unit_inner_stride("x", x)
    for name, tensor in (("lora_a", lora_a), ("lora_b", lora_b), ("sigma", sigma), ("ids", ids),
                         ("basis_of", basis_of), ("adapter_scale", adapter_scale), ("ranks", ranks)):
        require_contiguous(name, tensor)
    if out is not None:
        require_dims("out", out, 2, "[T, d_out_total]")
        require_size("out", out, 0, num_tokens, "the number of tokens T (x.shape[0])")
        require_unit_inner_stride("out", out)
        d_out = lora_b.shape[1]
        if out_offset < 0 or out_offset + d_out > out.shape[1]:
            raise ValueError(
                f"out_slice = ({out_offset}, {d_out}) does not fit in out with {out.shape[1]} columns"
            )


def check_shared_basis_values(
    ids: Tensor, basis_of: Tensor, ranks: Optional[Tensor], num_clusters: int, rank: int
) -> None:
    """Range checks on index tensors (reads data: one device sync on GPU)."""
    num_adapters = basis_of.shape[0]
    require_in_range("ids", ids, -1, num_adapters - 1, f"[-1, {num_adapters}) (N = {num_adapters} adapters; -1 = no adapter)")
    require_in_range("basis_of", basis_of, 0, num_clusters - 1, f"[0, {num_clusters}) (C = {num_clusters} bases)")
    if ranks is not None:
        require_in_range("ranks", ranks, 0, rank, f"[0, {rank}] (R = {rank})")


def _launch(out, out_offset, x, lora_a, lora_b, sigma, ids, basis_of, scale, adapter_scale, ranks, validate):
    """Value checks, then the selected backend's kernel (arguments already shape-checked)."""
    if validate:
        check_shared_basis_values(ids, basis_of, ranks, lora_a.shape[0], lora_a.shape[1])
    if x.shape[0] == 0 or lora_b.shape[1] == 0:
        return
    backend = _backends.select(_backends.Case(x.device, x.dtype, x.shape[0]))
    _backends.implementation(backend).shared_basis_lora_(
        out, out_offset, x, lora_a, lora_b, sigma, ids, basis_of, scale, adapter_scale, ranks
    )


def run_shared_basis_lora_(out, out_offset, x, lora_a, lora_b, sigma, ids, basis_of, scale, adapter_scale, ranks,
                           validate):
    """Body of lolakernels::shared_basis_lora_: adds the term into out in place."""
    check_shared_basis_args(x, lora_a, lora_b, sigma, ids, basis_of, scale, adapter_scale, ranks, out, out_offset)
    _launch(out, out_offset, x, lora_a, lora_b, sigma, ids, basis_of, scale, adapter_scale, ranks, validate)


def run_shared_basis_lora(x, lora_a, lora_b, sigma, ids, basis_of, scale, adapter_scale, ranks, validate):
    """Body of lolakernels::shared_basis_lora: the term [T, d_out] in x's dtype."""
    check_shared_basis_args(x, lora_a, lora_b, sigma, ids, basis_of, scale, adapter_scale, ranks)
    out = torch.zeros(x.shape[0], lora_b.shape[1], dtype=x.dtype, device=x.device)
    _launch(out, 0, x, lora_a, lora_b, sigma, ids, basis_of, scale, adapter_scale, ranks, validate)
    return out


@torch.library.custom_op("lolakernels::shared_basis_lora_", mutates_args=("out",))
def shared_basis_lora_inplace(
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
    validate: bool,
) -> None:
    """out[:, out_offset : out_offset + d_out] += shared-basis LoRA term (see reference)."""
    run_shared_basis_lora_(out, out_offset, x, lora_a, lora_b, sigma, ids, basis_of, scale, adapter_scale, ranks, validate)


@shared_basis_lora_inplace.register_fake
def _(out, out_offset, x, lora_a, lora_b, sigma, ids, basis_of, scale, adapter_scale, ranks, validate):
    check_shared_basis_args(x, lora_a, lora_b, sigma, ids, basis_of, scale, adapter_scale, ranks, out, out_offset)


@torch.library.custom_op("lolakernels::shared_basis_lora", mutates_args=())
def shared_basis_lora_functional(
    x: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    sigma: Optional[Tensor],
    ids: Tensor,
    basis_of: Tensor,
    scale: float,
    adapter_scale: Optional[Tensor],
    ranks: Optional[Tensor],
    validate: bool,
) -> Tensor:
    """The shared-basis LoRA term [T, d_out] in x's dtype (zero rows for id -1)."""
    return run_shared_basis_lora(x, lora_a, lora_b, sigma, ids, basis_of, scale, adapter_scale, ranks, validate)


@shared_basis_lora_functional.register_fake
def _(x, lora_a, lora_b, sigma, ids, basis_of, scale, adapter_scale, ranks, validate):
    check_shared_basis_args(x, lora_a, lora_b, sigma, ids, basis_of, scale, adapter_scale, ranks)
    return x.new_empty(x.shape[0], lora_b.shape[1])


@torch.library.custom_op("lolakernels::shared_basis_lora_backward", mutates_args=())
def shared_basis_lora_backward_op(
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
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_lora_a, grad_lora_b, grad_sigma); grad_sigma is empty when sigma is None.
    Opaque to tracing because the token -> cluster gather has data-dependent shapes."""
    grads = shared_basis_lora_backward(grad_term, x, lora_a, lora_b, sigma, ids, basis_of, scale, adapter_scale, ranks)
    grad_sigma = grads[3] if grads[3] is not None else x.new_empty(0)
    return grads[0], grads[1], grads[2], grad_sigma


@shared_basis_lora_backward_op.register_fake
def _(grad_term, x, lora_a, lora_b, sigma, ids, basis_of, scale, adapter_scale, ranks):
    grad_sigma = torch.empty_like(sigma) if sigma is not None else x.new_empty(0)
    return torch.empty_like(x), torch.empty_like(lora_a), torch.empty_like(lora_b), grad_sigma


def _setup_context(ctx, inputs, output):
    x, lora_a, lora_b, sigma, ids, basis_of, scale, adapter_scale, ranks, _validate = inputs
    ctx.save_for_backward(x, lora_a, lora_b, sigma, ids, basis_of, adapter_scale, ranks)
    ctx.scale = scale


def _backward(ctx, grad_term):
    x, lora_a, lora_b, sigma, ids, basis_of, adapter_scale, ranks = ctx.saved_tensors
    grad_x, grad_a, grad_b, grad_sigma = torch.ops.lolakernels.shared_basis_lora_backward(
        grad_term, x, lora_a, lora_b, sigma, ids, basis_of, ctx.scale, adapter_scale, ranks
    )
    needs = ctx.needs_input_grad
    return (
        grad_x if needs[0] else None,
        grad_a if needs[1] else None,
        grad_b if needs[2] else None,
        grad_sigma if needs[3] else None,
        None, None, None, None, None, None,
    )


shared_basis_lora_functional.register_autograd(_backward, setup_context=_setup_context)
