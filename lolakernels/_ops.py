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
import warnings
from typing import Optional

import torch
from torch import Tensor

from . import _backends, _env
from ._checks import (
    require_contiguous,
    require_dims,
    require_dtype,
    require_in_range,
    require_no_overlap,
    require_not_negated,
    require_same_device,
    require_size,
    require_unit_inner_stride,
    resolve_negated,
)
from . import cpu  # the wrapper only; the extension itself loads on first use
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
        require_not_negated("out", out)
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


_CPU_LOADED = False


def _cpu_built() -> bool:
    """Whether lolakernels._C loads. A loaded extension stays loaded, so a True is kept: the
    import machinery behind backend_available costs ~10 µs a call right after a cache-evicting
    GEMM."""
    global _CPU_LOADED
    if not _CPU_LOADED:
        _CPU_LOADED = _backends.backend_available("cpu")[0]
    return _CPU_LOADED


def _launch(out, out_offset, x, lora_a, lora_b, sigma, ids, basis_of, scale, adapter_scale, ranks, validate):
    """Value checks, then the kernel of the selected backend; arguments already shape-checked.
    On the CPU the values are checked whatever ``validate`` says (it costs no sync there): the
    C++ kernel checks them itself, any other backend here gets them checked first."""
    backend = _backends.select(_backends.Case(x.device, x.dtype, x.shape[0]))
    if validate or (x.device.type == "cpu" and backend != "cpu"):
        check_shared_basis_values(ids, basis_of, ranks, lora_a.shape[0], lora_a.shape[1])
    if x.shape[0] == 0 or lora_b.shape[1] == 0:
        return
    x, lora_a, lora_b, sigma, ids, basis_of, adapter_scale, ranks = resolve_negated(
        x, lora_a, lora_b, sigma, ids, basis_of, adapter_scale, ranks)
    _backends.implementation(backend).shared_basis_lora_(
        out, out_offset, x, lora_a, lora_b, sigma, ids, basis_of, scale, adapter_scale, ranks
    )


def run_plain_cpu(out, out_offset, x, lora_a, lora_b, sigma, ids, basis_of, scale, adapter_scale, ranks
                  ) -> Optional[Tensor]:
    """The per-layer call of CPU inference, judged and run in one C++ call: out (a new zeroed
    [T, d_out] term when out is None) once the CPU kernel ran, validate or not, or None, having run
    nothing, for any call the kernel does not take as it is (cpu.run_vouched_shared_basis_lora).
    None means only "not vouched for": the caller then runs the full checks, which raise with the
    reason, or routes the call to the backend that takes it (tests/test_refusals.py sends every
    refused input through this first). Right after a cache-evicting GEMM the thirty small
    functions of the full checks and the backend walk cost ~60 µs, about 2% of a decode-size bf16
    GEMM, and the torch aminmax checks of the ids ~50 µs more; the kernel range-checks ids and
    every entry of basis_of and ranks before it writes anything (T = 0 included) and raises the
    same ValueError."""
    try:
        if not (x.is_cpu and type(scale) is float and _env.read("LOLA_BACKEND") in ("", "cpu") and _cpu_built()):
            return None
        target = torch.zeros(x.shape[0], lora_b.shape[1], dtype=x.dtype) if out is None else out
    except (AttributeError, TypeError, IndexError):  # not tensors, or the wrong number of dims
        return None
    if cpu.run_vouched_shared_basis_lora(target, out_offset, x, lora_a, lora_b, sigma, ids, basis_of, scale,
                                         adapter_scale, ranks):
        return target
    return None


def run_shared_basis_lora_(out, out_offset, x, lora_a, lora_b, sigma, ids, basis_of, scale, adapter_scale, ranks,
                           validate):
    """Body of lolakernels::shared_basis_lora_: adds the term into out in place."""
    if run_plain_cpu(out, out_offset, x, lora_a, lora_b, sigma, ids, basis_of, scale, adapter_scale, ranks) is not None:
        return
    check_shared_basis_args(x, lora_a, lora_b, sigma, ids, basis_of, scale, adapter_scale, ranks, out, out_offset)
    # Here, not in the checks: it reads addresses, which fake tensors under tracing do not have.
    require_no_overlap("out", out, dict(x=x, lora_a=lora_a, lora_b=lora_b, sigma=sigma, ids=ids, basis_of=basis_of,
                                        adapter_scale=adapter_scale, ranks=ranks))
    _launch(out, out_offset, x, lora_a, lora_b, sigma, ids, basis_of, scale, adapter_scale, ranks, validate)


def run_shared_basis_lora(x, lora_a, lora_b, sigma, ids, basis_of, scale, adapter_scale, ranks, validate):
    """Body of lolakernels::shared_basis_lora: the term [T, d_out] in x's dtype."""
    term = run_plain_cpu(None, 0, x, lora_a, lora_b, sigma, ids, basis_of, scale, adapter_scale, ranks)
    if term is not None:
        return term
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


def _bump_version_of_first_argument(op_name: str) -> None:
    """Registers a lean ADInplaceOrView kernel for an in-place op whose only mutated argument is
    its first: bump that tensor's version counter (so autograd still refuses a tensor it saved
    and the op then changed) and go on to the backend. torch.library.custom_op's own kernel does
    the same after rebuilding every argument with its schema defaults, which costs ~60 µs a call
    (torch 2.13): in a torch.compile'd CPU model, where each layer calls the op through the
    dispatcher, that was most of the op's ~90 µs overhead over an eager call. Where this torch
    lacks the private pieces used here, its own kernel stays."""
    after_inplace_or_view = getattr(torch._C, "_after_ADInplaceOrView_keyset", None)
    overload = getattr(getattr(torch.ops.lolakernels, op_name), "default", None)
    if after_inplace_or_view is None or not hasattr(overload, "redispatch"):
        return
    increment_version = torch.autograd.graph.increment_version

    def bump_and_redispatch(keyset, mutated, *args):
        increment_version(mutated)
        return overload.redispatch(keyset & after_inplace_or_view, mutated, *args)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Overriding a previously registered kernel.*")
        _LIBRARY.impl(op_name, bump_and_redispatch, "ADInplaceOrView", with_keyset=True)


_LIBRARY = torch.library.Library("lolakernels", "FRAGMENT")
_bump_version_of_first_argument("shared_basis_lora_")


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


# ---------------------------------------------------------------------------------------------
# nf4 family. An nf4 weight crosses the op boundary as its tensors (NF4_WEIGHT_ARGS below); the
# checks that read a bitsandbytes QuantState live in lolakernels/ops/nf4.py.
#
#   lolakernels::nf4_dequantize(<weight>, out_dtype) -> Tensor
#   lolakernels::nf4_dora_weight_norm(<weight>, lora_a, lora_b, scale) -> Tensor
#   lolakernels::nf4_lora_linear(x, <weight>, compute_dtype, x_lora?, lora_a?, lora_b?, scale, bias?,
#                                magnitude?, weight_norm?) -> Tensor
#   lolakernels::nf4_lora_linear_backward(grad, x, <weight>, ..., needs) -> 6 gradients
# ---------------------------------------------------------------------------------------------

from .reference import nf4 as _nf4_reference  # noqa: E402


def nf4_weight_args(weight: "_nf4_reference.Nf4Weight") -> tuple:
    """(packed, absmax, absmax_q, absmax_code, absmax_scale, absmax_offset, absmax_blocksize,
    blocksize, shape, state_dtype): the op arguments that carry one nf4 weight."""
    return (weight.packed, weight.absmax, weight.absmax_q, weight.absmax_code, weight.absmax_scale,
            weight.absmax_offset, weight.absmax_blocksize, weight.blocksize, list(weight.shape), weight.dtype)


def _nf4_weight(packed, absmax, absmax_q, absmax_code, absmax_scale, absmax_offset, absmax_blocksize, blocksize,
                shape, state_dtype) -> "_nf4_reference.Nf4Weight":
    return _nf4_reference.Nf4Weight(packed, tuple(int(s) for s in shape), int(blocksize), state_dtype, absmax,
                                    absmax_q, absmax_code, absmax_scale, absmax_offset, int(absmax_blocksize))


def nf4_backend(weight, op: str, dtype: torch.dtype, num_tokens: int = 0, out_dtype=None, lora_dtype=None):
    """The module of the backend that runs an nf4 op on this weight."""
    case = _backends.Case(weight.packed.device, dtype, num_tokens, op=op, out_dtype=out_dtype, lora_dtype=lora_dtype)
    return _backends.implementation(_backends.select(case), "nf4")


def run_nf4_dequantize(weight, out_dtype: torch.dtype) -> Tensor:
    return nf4_backend(weight, "nf4_dequantize", out_dtype).nf4_dequantize(weight, out_dtype)


def run_nf4_dora_weight_norm(weight, lora_a: Tensor, lora_b: Tensor, scale: float) -> Tensor:
    backend = nf4_backend(weight, "nf4_dequantize", weight.dtype)
    return _nf4_reference.dora_weight_norm(weight, lora_a, lora_b, scale, backend.dequantize_rows)


def run_nf4_lora_linear(x, weight, compute_dtype, x_lora, lora_a, lora_b, scale, bias, magnitude, weight_norm):
    """Body of lolakernels::nf4_lora_linear on 2-D, checked arguments."""
    if x.shape[0] == 0:
        return x.new_empty(0, weight.shape[0])
    x, x_lora, lora_a, lora_b, bias, magnitude, weight_norm = resolve_negated(
        x, x_lora, lora_a, lora_b, bias, magnitude, weight_norm)
    backend = nf4_backend(weight, "nf4_lora_linear", compute_dtype, x.shape[0], x.dtype,
                          None if lora_a is None else lora_a.dtype)
    return backend.nf4_lora_linear(x, weight, compute_dtype, x_lora, lora_a, lora_b, scale, bias, magnitude,
                                   weight_norm)


@torch.library.custom_op("lolakernels::nf4_dequantize", mutates_args=())
def nf4_dequantize_op(
    packed: Tensor,
    absmax: Optional[Tensor],
    absmax_q: Optional[Tensor],
    absmax_code: Optional[Tensor],
    absmax_scale: Optional[Tensor],
    absmax_offset: Optional[Tensor],
    absmax_blocksize: int,
    blocksize: int,
    shape: list[int],
    state_dtype: torch.dtype,
    out_dtype: torch.dtype,
) -> Tensor:
    """The whole nf4 weight dequantized to out_dtype (see lolakernels.reference.nf4)."""
    weight = _nf4_weight(packed, absmax, absmax_q, absmax_code, absmax_scale, absmax_offset, absmax_blocksize,
                         blocksize, shape, state_dtype)
    return run_nf4_dequantize(weight, out_dtype)


@nf4_dequantize_op.register_fake
def _(packed, absmax, absmax_q, absmax_code, absmax_scale, absmax_offset, absmax_blocksize, blocksize, shape,
      state_dtype, out_dtype):
    return packed.new_empty(shape, dtype=out_dtype)


@torch.library.custom_op("lolakernels::nf4_dora_weight_norm", mutates_args=())
def nf4_dora_weight_norm_op(
    packed: Tensor,
    absmax: Optional[Tensor],
    absmax_q: Optional[Tensor],
    absmax_code: Optional[Tensor],
    absmax_scale: Optional[Tensor],
    absmax_offset: Optional[Tensor],
    absmax_blocksize: int,
    blocksize: int,
    shape: list[int],
    state_dtype: torch.dtype,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
) -> Tensor:
    """PEFT's DoRA weight norm ‖W + scale · lora_b lora_a‖ per output row, from dequantized tiles."""
    weight = _nf4_weight(packed, absmax, absmax_q, absmax_code, absmax_scale, absmax_offset, absmax_blocksize,
                         blocksize, shape, state_dtype)
    return run_nf4_dora_weight_norm(weight, lora_a, lora_b, scale)


@nf4_dora_weight_norm_op.register_fake
def _(packed, absmax, absmax_q, absmax_code, absmax_scale, absmax_offset, absmax_blocksize, blocksize, shape,
      state_dtype, lora_a, lora_b, scale):
    return lora_a.new_empty(shape[0])


@torch.library.custom_op("lolakernels::nf4_lora_linear", mutates_args=())
def nf4_lora_linear_op(
    x: Tensor,
    packed: Tensor,
    absmax: Optional[Tensor],
    absmax_q: Optional[Tensor],
    absmax_code: Optional[Tensor],
    absmax_scale: Optional[Tensor],
    absmax_offset: Optional[Tensor],
    absmax_blocksize: int,
    blocksize: int,
    shape: list[int],
    state_dtype: torch.dtype,
    compute_dtype: torch.dtype,
    x_lora: Optional[Tensor],
    lora_a: Optional[Tensor],
    lora_b: Optional[Tensor],
    scale: float,
    bias: Optional[Tensor],
    magnitude: Optional[Tensor],
    weight_norm: Optional[Tensor],
) -> Tensor:
    """y [M, N] in x's dtype: nf4 linear + LoRA / DoRA (see lolakernels.reference.nf4)."""
    weight = _nf4_weight(packed, absmax, absmax_q, absmax_code, absmax_scale, absmax_offset, absmax_blocksize,
                         blocksize, shape, state_dtype)
    return run_nf4_lora_linear(x, weight, compute_dtype, x_lora, lora_a, lora_b, scale, bias, magnitude, weight_norm)


@nf4_lora_linear_op.register_fake
def _(x, packed, absmax, absmax_q, absmax_code, absmax_scale, absmax_offset, absmax_blocksize, blocksize, shape,
      state_dtype, compute_dtype, x_lora, lora_a, lora_b, scale, bias, magnitude, weight_norm):
    return x.new_empty(x.shape[0], shape[0])


def nf4_lora_linear_backward(grad, x, weight, compute_dtype, x_lora, lora_a, lora_b, scale, bias, magnitude,
                             weight_norm, needs):
    """Gradients (x, x_lora, lora_a, lora_b, bias, magnitude) of nf4_lora_linear, None where not
    needed. The weight term re-dequantizes W tile by tile (never whole): dx = (dy · s) · W_C, the
    transpose of bitsandbytes' backward; weight_norm is a constant, as in PEFT (DoRA §4.3)."""
    need_x, need_x_lora, need_a, need_b, need_bias, need_magnitude = needs
    dequantize_rows = nf4_backend(weight, "nf4_dequantize", weight.dtype).dequantize_rows
    g = grad.float()
    s = None if magnitude is None else (magnitude / weight_norm).float()
    grad_x = grad_x_lora = grad_a = grad_b = grad_bias = grad_magnitude = None
    base = None
    if need_x or need_magnitude:
        g_base = (g if s is None else g * s).to(compute_dtype).float()
        x_compute = x.to(compute_dtype).float()
        grad_x = torch.zeros(x.shape, dtype=torch.float32, device=x.device) if need_x else None
        base = torch.empty(g.shape, dtype=torch.float32, device=x.device) if need_magnitude else None
        for row0, rows in _nf4_reference.row_tiles(weight):
            # bitsandbytes' backward reads W in the state's dtype; its forward, straight in the compute dtype.
            tile = dequantize_rows(weight, row0, rows, weight.dtype).to(compute_dtype).float()
            if need_x:
                grad_x += g_base[:, row0:row0 + rows] @ tile
            if need_magnitude:
                if weight.dtype != compute_dtype:
                    tile = dequantize_rows(weight, row0, rows, compute_dtype).float()
                base[:, row0:row0 + rows] = x_compute @ tile.t()
    if lora_a is not None:
        x_l = (x.to(lora_a.dtype) if x_lora is None else x_lora).float()
        a, b = lora_a.float(), lora_b.float()
        h = x_l @ a.t()
        g_t = g * scale if s is None else g * s * scale
        if need_b:
            grad_b = (g_t.t() @ h).to(lora_b.dtype)
        g_h = g_t @ b
        if need_a:
            grad_a = (g_h.t() @ x_l).to(lora_a.dtype)
        if need_x or need_x_lora:
            from_lora = g_h @ a
            if x_lora is None and need_x:
                grad_x = from_lora if grad_x is None else grad_x + from_lora
            elif x_lora is not None and need_x_lora:
                grad_x_lora = from_lora.to(x_lora.dtype)
        if need_magnitude:
            base = base + scale * (h @ b.t())
    if need_magnitude:
        grad_magnitude = ((g * base).sum(0) / weight_norm.float()).to(magnitude.dtype)
    if need_bias:
        grad_bias = g.sum(0).to(bias.dtype)
    if grad_x is not None:
        grad_x = grad_x.to(x.dtype)
    return grad_x, grad_x_lora, grad_a, grad_b, grad_bias, grad_magnitude


@torch.library.custom_op("lolakernels::nf4_lora_linear_backward", mutates_args=())
def nf4_lora_linear_backward_op(
    grad: Tensor,
    x: Tensor,
    packed: Tensor,
    absmax: Optional[Tensor],
    absmax_q: Optional[Tensor],
    absmax_code: Optional[Tensor],
    absmax_scale: Optional[Tensor],
    absmax_offset: Optional[Tensor],
    absmax_blocksize: int,
    blocksize: int,
    shape: list[int],
    state_dtype: torch.dtype,
    compute_dtype: torch.dtype,
    x_lora: Optional[Tensor],
    lora_a: Optional[Tensor],
    lora_b: Optional[Tensor],
    scale: float,
    bias: Optional[Tensor],
    magnitude: Optional[Tensor],
    weight_norm: Optional[Tensor],
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_x_lora, grad_lora_a, grad_lora_b, grad_bias, grad_magnitude); an empty tensor
    stands for a gradient that is not needed."""
    weight = _nf4_weight(packed, absmax, absmax_q, absmax_code, absmax_scale, absmax_offset, absmax_blocksize,
                         blocksize, shape, state_dtype)
    grads = nf4_lora_linear_backward(grad, x, weight, compute_dtype, x_lora, lora_a, lora_b, scale, bias, magnitude,
                                     weight_norm, needs)
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@nf4_lora_linear_backward_op.register_fake
def _(grad, x, packed, absmax, absmax_q, absmax_code, absmax_scale, absmax_offset, absmax_blocksize, blocksize, shape,
      state_dtype, compute_dtype, x_lora, lora_a, lora_b, scale, bias, magnitude, weight_norm, needs):
    like = (x, x_lora, lora_a, lora_b, bias, magnitude)
    return tuple(torch.empty_like(t) if t is not None and need else x.new_empty(0) for t, need in zip(like, needs))


_NF4_DIFFERENTIABLE = {0: 0, 12: 1, 13: 2, 14: 3, 16: 4, 17: 5}  # input index -> gradient slot


def _nf4_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*(t if isinstance(t, Tensor) else None for t in inputs))
    ctx.constants = tuple(None if isinstance(t, Tensor) else t for t in inputs)


def _nf4_backward(ctx, grad):
    inputs = [saved if saved is not None else constant for saved, constant in zip(ctx.saved_tensors, ctx.constants)]
    needs = [bool(ctx.needs_input_grad[i]) for i in _NF4_DIFFERENTIABLE]
    grads = torch.ops.lolakernels.nf4_lora_linear_backward(grad, *inputs, needs)
    result = [None] * len(inputs)
    for index, slot in _NF4_DIFFERENTIABLE.items():
        if needs[slot]:
            result[index] = grads[slot]
    return tuple(result)


nf4_lora_linear_op.register_autograd(_nf4_backward, setup_context=_nf4_setup_context)
