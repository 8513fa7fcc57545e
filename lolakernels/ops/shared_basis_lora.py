"""Batched shared-basis LoRA and plain multi-LoRA: one launch serves a batch that mixes adapters.

For token t with adapter a = ids[t] (``-1`` = base model only) and cluster c = basis_of[a]:

    y[t] += scale · B_c · Σ_a · A_c · x[t]

Shapes: x [T, d_in]; lora_a [C, R, d_in] (PEFT's lora_A layout, shared down-projection);
lora_b [C, d_out, R] (shared up-projection); sigma [N, R] (diagonal, JD-Diag) or [N, R, R]
(full, JD-Full); basis_of [N] int; ids [T] int32. Plain multi-LoRA is the case C = N,
basis_of = arange(N), Σ_a = scale_a · I.
"""
from __future__ import annotations

import operator

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .. import _ops  # registers torch.ops.lolakernels.*
from .._checks import require_dtype, require_in_range, require_same_device

_CPU = torch.device("cpu")
# Dynamo folds a call of this function to True by the function's identity, so a module alias
# traces as torch.compiler.is_compiling does and saves the attribute walk in eager calls.
_is_compiling = torch.compiler.is_compiling
_grad_enabled = torch.is_grad_enabled

OutSlice = Optional[Sequence[int]]


_INT32 = torch.iinfo(torch.int32)


def _index_tensor(name: str, values, device: torch.device, validate: bool) -> Tensor:
    """int32 index tensor; int64 tensors (torch's default) and integer sequences are converted,
    other dtypes are refused by the op's checks. A value int32 cannot hold is refused, not
    wrapped (2**32 + 1 would read as adapter 1): always on the CPU, where checking costs no sync,
    and with ``validate`` elsewhere; in eager calls only."""
    if not isinstance(values, Tensor):
        values = torch.as_tensor(values, device=device)
        if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
            raise TypeError(f"{name} must hold integers, got {str(values.dtype).replace('torch.', '')} values")
    if values.dtype == torch.int64:
        # (Not while tracing: the check reads data, a graph break under fullgraph=True.)
        if (validate or values.is_cpu) and not _is_compiling():
            require_in_range(name, values, _INT32.min, _INT32.max, "int32, so it is no valid index")
        return values.to(torch.int32)
    return values


# basis_of of the two cases that imply it (one basis: zeros; multi-LoRA: arange), per (N, device).
# Building one is a torch op, ~70 µs right after a cache-evicting GEMM: more than a decode kernel.
_IMPLIED_BASES: dict[tuple, Tensor] = {}


def _build_basis_of(num_adapters: int, device: torch.device, identity: bool) -> Tensor:
    """int32 [N]: arange(N) (each adapter its own basis) if identity, else zeros (one basis).
    Built outside inference mode, so that a later call with autograd can save it for backward."""
    with torch.inference_mode(False):
        if identity:
            return torch.arange(num_adapters, dtype=torch.int32, device=device)
        return torch.zeros(num_adapters, dtype=torch.int32, device=device)


def _implied_basis_of(num_adapters: int, device: torch.device, identity: bool) -> Tensor:
    """The basis_of a call without one implies (see _build_basis_of): a fresh one under tracing,
    else the one eager calls share (_cached_basis_of)."""
    if _is_compiling():
        return _build_basis_of(num_adapters, device, identity)
    return _cached_basis_of(num_adapters, device, identity)


def _cached_basis_of(num_adapters: int, device: torch.device, identity: bool) -> Tensor:
    """One implied basis_of per (N, device, identity) for every eager call: never handed to the
    caller, and the kernels do not write it."""
    key = (num_adapters, device, identity)
    basis_of = _IMPLIED_BASES.get(key)
    if basis_of is None:
        if len(_IMPLIED_BASES) >= 256:
            _IMPLIED_BASES.clear()
        basis_of = _IMPLIED_BASES[key] = _build_basis_of(num_adapters, device, identity)
    return basis_of


def _require_tensors(**named) -> None:
    for name, value in named.items():
        if not isinstance(value, Tensor) and not (value is None and name == "sigma"):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def _out_offset(out: Optional[Tensor], out_slice: OutSlice, d_out: int) -> int:
    if out_slice is None:
        if out is not None and out.dim() == 2 and out.shape[1] != d_out:
            raise ValueError(
                f"out has {out.shape[1]} columns but the LoRA term has d_out = {d_out}: "
                "pass out_slice=(offset, size) to write a column slice"
            )
        return 0
    if out is None:
        raise ValueError("out_slice needs out: it selects the columns of out that receive the term")
    if len(out_slice) != 2:
        raise ValueError(f"out_slice must be (offset, size), got {tuple(out_slice)!r}")
    try:
        offset, size = (operator.index(v) for v in out_slice)
    except TypeError:
        raise TypeError(f"out_slice must be two ints (offset, size), got {tuple(out_slice)!r}") from None
    if size != d_out:
        raise ValueError(f"out_slice size {size} != d_out {d_out} (lora_b.shape[1])")
    return offset


def _eager_cpu(x, lora_a, lora_b, sigma, ids, basis_of, scale, adapter_scale, ranks, out, out_slice,
               implied_identity=False) -> Optional[Tensor]:
    """The per-layer call of CPU inference, straight to the kernel: ``out`` (or the new term when
    out is None) once the kernel ran, or None for any call that is not one, which the caller
    then takes down the general path with its checks, errors, autograd and tracing.

    A call qualifies when nothing needs autograd (grad mode off, as when a PEFT model with
    trainable weights serves under no_grad or inference_mode, or no tensor requires grad), it is
    not being traced, out_slice (if any) is an (int, int) pair of the term's width, and
    _ops.run_plain_cpu takes the rest.
    basis_of None means the implied one (zeros, or arange when implied_identity). Right after a
    cache-evicting GEMM each distinct Python step costs 2-15 µs (the interpreter's and torch's
    binding code come back from memory); the steps of the general path this one leaves out
    (index conversions, x.device, the backend lookup) took 10-20 µs a call in A/B runs, next to a
    bf16 4096 × 4096 decode GEMM of ~2.8 ms."""
    try:
        if not x.is_cpu:  # a GPU call pays for no more than this
            return None
        if _grad_enabled() and (x.requires_grad or lora_a.requires_grad or lora_b.requires_grad or (
                sigma is not None and sigma.requires_grad)):
            return None
        d_out = lora_b.shape[1]
        if out_slice is None:
            offset = 0
            if out is not None and out.shape[1] != d_out:
                return None
        else:
            offset, size = out_slice
            if out is None or type(offset) is not int or type(size) is not int or size != d_out:
                return None
        if _is_compiling():
            return None
        if basis_of is None:
            basis_of = _cached_basis_of(lora_a.shape[0] if implied_identity else sigma.shape[0] if sigma is not None
                                        else 1, _CPU, implied_identity)
    except (AttributeError, TypeError, ValueError, IndexError):  # not tensors, wrong dims: the checks say which
        return None
    return _ops.run_plain_cpu(out, offset, x, lora_a, lora_b, sigma, ids, basis_of, scale, adapter_scale, ranks)


def _apply(x, lora_a, lora_b, sigma, ids, basis_of, scale, adapter_scale, ranks, out, out_slice, validate):
    d_out = lora_b.shape[1] if isinstance(lora_b, Tensor) and lora_b.dim() == 3 else 0
    offset = _out_offset(out, out_slice, d_out)
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or lora_a.requires_grad or lora_b.requires_grad or (sigma is not None and sigma.requires_grad))
    if needs_grad:
        # Autograd needs the functional op; the in-place kernel is the inference fast path. The
        # term is then added to out as PEFT adds its LoRA term: rounded to the dtype, then summed.
        if out is not None:
            _ops.check_shared_basis_args(x, lora_a, lora_b, sigma, ids, basis_of, scale, adapter_scale, ranks, out,
                                         offset)
        term = torch.ops.lolakernels.shared_basis_lora(
            x, lora_a, lora_b, sigma, ids, basis_of, scale, adapter_scale, ranks, validate
        )
        if out is None:
            return term
        out.narrow(1, offset, d_out).add_(term)
        return out
    if torch.compiler.is_compiling():
        if out is None:
            return torch.ops.lolakernels.shared_basis_lora(
                x, lora_a, lora_b, sigma, ids, basis_of, scale, adapter_scale, ranks, validate
            )
        torch.ops.lolakernels.shared_basis_lora_(
            out, offset, x, lora_a, lora_b, sigma, ids, basis_of, scale, adapter_scale, ranks, validate
        )
        return out
    # Eager inference runs the op's own body without the dispatcher: its Python kernels for the
    # custom op (autograd, version bump, dynamo-disable wrapper) cost ~45 µs a call warm and
    # ~135 µs right after a cache-evicting GEMM, more than the kernel at decode sizes.
    if out is None:
        return _ops.run_shared_basis_lora(x, lora_a, lora_b, sigma, ids, basis_of, scale, adapter_scale, ranks,
                                          validate)
    _ops.run_shared_basis_lora_(out, offset, x, lora_a, lora_b, sigma, ids, basis_of, scale, adapter_scale, ranks,
                                validate)
    return out


def shared_basis_lora(
    x: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    sigma: Optional[Tensor],
    ids: Tensor,
    *,
    basis_of: Optional[Tensor] = None,
    scale: float = 1.0,
    out: Optional[Tensor] = None,
    out_slice: OutSlice = None,
    validate: bool = True,
) -> Tensor:
    """Shared-basis LoRA for a mixed batch: ``out[t] += scale · lora_b[c] · Σ_a · lora_a[c] · x[t]``.

    Args:
        x: ``[T, d_in]`` activations (unit stride in the last dim; row stride free).
        lora_a: ``[C, R, d_in]`` shared down-projection bases.
        lora_b: ``[C, d_out, R]`` shared up-projection bases.
        sigma: ``[N, R]`` (diagonal) or ``[N, R, R]`` (full) per-adapter cores, or ``None`` for
            identity (then N = len(basis_of), or C when basis_of is omitted).
        ids: ``[T]`` int32 (int64 is converted) adapter of each token, ``-1`` = no adapter (row left untouched).
        basis_of: ``[N]`` basis (cluster) of each adapter; may be omitted only when C = 1.
        scale: multiplier applied to every adapter's term.
        out: if given, ``[T, d_total]``; the term is added in place (one rounding) and ``out`` is
            returned. Otherwise a new ``[T, d_out]`` tensor holding only the term is returned.
        out_slice: ``(offset, size)``: add into ``out[:, offset:offset+size]`` (fused qkv/gate_up).
        validate: check ids/basis_of ranges (a device sync on GPU). Serving engines that checked
            them once per step pass ``False``; shapes, dtypes and devices are always checked, and
            the CPU kernel range-checks ids, basis_of and ranks itself on every call (it costs no
            sync there), so on the CPU a bad index is refused either way.

    All float tensors share one dtype (float32, float16, bfloat16; the CPU kernel takes float32
    and bfloat16, other cases run on the reference); accumulation is fp32. On CPUs with
    AVX512-BF16 the bf16 kernel rounds the rank-R vector ``Σ_a · lora_a[c] · x[t]`` (times the
    scale) to bf16 before the expand, as PEFT's bf16 path rounds its intermediate.
    """
    num_clusters = lora_a.shape[0] if isinstance(lora_a, Tensor) and lora_a.dim() == 3 else 1
    if basis_of is not None or num_clusters == 1:
        term = _eager_cpu(x, lora_a, lora_b, sigma, ids, basis_of, scale, None, None, out, out_slice)
        if term is not None:
            return term
    _require_tensors(x=x, lora_a=lora_a, lora_b=lora_b, sigma=sigma)
    device = x.device
    ids = _index_tensor("ids", ids, device, validate)
    if basis_of is None:
        if num_clusters != 1:
            raise ValueError(
                f"basis_of is required: lora_a holds C = {num_clusters} bases, so each adapter's basis must be given"
            )
        num_adapters = sigma.shape[0] if sigma is not None else 1
        basis_of = _implied_basis_of(num_adapters, device, identity=False)
    else:
        basis_of = _index_tensor("basis_of", basis_of, device, validate)
    return _apply(x, lora_a, lora_b, sigma, ids, basis_of, float(scale), None, None, out, out_slice, validate)


def multi_lora(
    x: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    ids: Tensor,
    *,
    scale: Union[float, Tensor, None] = None,
    ranks: Optional[Tensor] = None,
    out: Optional[Tensor] = None,
    out_slice: OutSlice = None,
    validate: bool = True,
) -> Tensor:
    """Plain multi-LoRA (uncompressed adapters) for a mixed batch:
    ``out[t] += scale[a] · lora_b[a] · lora_a[a] · x[t]`` with ``a = ids[t]``.

    Args:
        x: ``[T, d_in]``.
        lora_a: ``[N, r, d_in]`` stacked PEFT ``lora_A`` weights (padded to a common r).
        lora_b: ``[N, d_out, r]`` stacked PEFT ``lora_B`` weights.
        ids: ``[T]`` int32 (int64 is converted) adapter of each token, ``-1`` = no adapter.
        scale: PEFT's ``scaling`` per adapter ``[N]`` (float32), or one float for all (default 1).
        ranks: ``[N]`` true rank of each adapter when padded to r; the padding is ignored (its
            lora_b columns must be finite, as zero padding is: they meet zeros, and 0 · inf is nan).
        out, out_slice, validate: as in :func:`shared_basis_lora`.
    """
    if isinstance(scale, Tensor) and scale.requires_grad and _grad_enabled():
        raise ValueError("scale does not take gradients (the op has none for it); pass scale.detach(), or "
                         "train the adapters' weights")
    if ranks is None or isinstance(ranks, Tensor):
        adapter_scale, scalar_scale = (scale, 1.0) if isinstance(scale, Tensor) else (None, 1.0 if scale is None else scale)
        term = _eager_cpu(x, lora_a, lora_b, None, ids, None, scalar_scale, adapter_scale, ranks, out, out_slice,
                          implied_identity=True)
        if term is not None:
            return term
    _require_tensors(x=x, lora_a=lora_a, lora_b=lora_b)
    device = x.device
    ids = _index_tensor("ids", ids, device, validate)
    num_adapters = lora_a.shape[0] if lora_a.dim() == 3 else 0
    basis_of = _implied_basis_of(num_adapters, device, identity=True)
    adapter_scale = None
    scalar_scale = 1.0
    if isinstance(scale, Tensor):
        if scale.dim() != 1 or scale.shape[0] != num_adapters:
            raise ValueError(f"scale must be a float or a [N] = [{num_adapters}] tensor, got shape {list(scale.shape)}")
        # named here as the caller knows it; the op's own checks call it adapter_scale
        require_dtype("scale", scale, (torch.float32,), " (PEFT's scaling per adapter)")
        require_same_device({"x": x, "scale": scale})
        adapter_scale = scale
    elif scale is not None:
        scalar_scale = float(scale)
    if ranks is not None:
        ranks = _index_tensor("ranks", ranks, device, validate)
    return _apply(x, lora_a, lora_b, None, ids, basis_of, scalar_scale, adapter_scale, ranks, out, out_slice, validate)
