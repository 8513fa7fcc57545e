"""Thin wrapper over the pybind11 CPU module ``lolakernels._C`` (DLPack capsules and raw pointers, no torch ABI)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor
from torch.utils.dlpack import to_dlpack as _to_dlpack

from . import _env
from ._raw import address

if TYPE_CHECKING:
    from .reference.nf4 import Nf4Weight

CPU_DTYPES = (torch.float32, torch.bfloat16)
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1}
NF4_DEQUANTIZE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NF4_LINEAR_DTYPES = CPU_DTYPES
_NF4_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


_LOADED = None


def _module():
    global _LOADED
    if _LOADED is None:
        try:
            from . import _C
        except ImportError as error:  # pragma: no cover - only on a broken install
            raise ImportError(f"lolakernels._C is not built or cannot load: {error}") from error
        _LOADED = _C
    return _LOADED


def available() -> tuple[bool, str]:
    try:
        _module()
    except ImportError as error:
        return False, str(error)
    return True, ""


# isa() per raw LOLA_CPU_ISA value: one dict probe a call instead of the string methods (~5 µs
# with the lookup they fed, right after a cache-evicting GEMM). Bad values raise each time.
_ISA_BY_SETTING: dict[str, int] = {}


def isa() -> int:
    """Instruction set the kernels use: the best this CPU has, or ``LOLA_CPU_ISA`` if set."""
    setting = _env.read("LOLA_CPU_ISA")
    code = _ISA_BY_SETTING.get(setting)
    if code is None:
        code = _ISA_BY_SETTING[setting] = _isa_for(setting.strip().lower())
    return code


def _isa_for(forced: str) -> int:
    module = _module()
    names = {"scalar": module.ISA_SCALAR, "avx512": module.ISA_AVX512, "avx512_bf16": module.ISA_AVX512_BF16}
    if not forced:
        return module.best_isa()
    if forced not in names:
        raise ValueError(f"LOLA_CPU_ISA={forced!r}: expected one of {sorted(names)}")
    if names[forced] > module.best_isa():
        raise ValueError(f"LOLA_CPU_ISA={forced!r} but this CPU supports at most {module.isa_name(module.best_isa())}")
    return names[forced]


# torch's thread count, which the kernel follows as torch's own CPU ops do; bound once, so the
# per-layer call skips the lookup of torch.get_num_threads.
_num_threads = torch.get_num_threads


# What reading an argument raises when it is not a tensor (AttributeError from is_neg, TypeError
# from the export), has no storage (sparse: RuntimeError) or no data (meta: BufferError); and a bad
# LOLA_CPU_ISA (ValueError from isa()), which the general path raises again with its message.
_NOT_EXPORTED = (AttributeError, TypeError, RuntimeError, BufferError, ValueError)


def run_vouched_shared_basis_lora(out: Tensor, out_offset: int, x: Tensor, lora_a: Tensor, lora_b: Tensor,
                                  sigma: Optional[Tensor], ids: Tensor, basis_of: Tensor, scale: float,
                                  adapter_scale: Optional[Tensor], ranks: Optional[Tensor]) -> bool:
    """Adds the term into out[:, out_offset : out_offset + d_out] and returns True if the kernel
    takes every argument as it is (CPU, dtypes, shapes, contiguity: checked in C++ on the tensors'
    DLPack descriptions), else returns False having run nothing. Value errors (ids, basis_of,
    ranks) raise ValueError. Reading the seven tensors' descriptions through Python instead cost
    ~35 µs more a call right after a cache-evicting GEMM, where this runs once per layer. A lazily
    negated view (is_neg(), which DLPack does not carry) is left to the general path, which
    resolves it (or refuses it as out)."""
    try:
        if (x.is_neg() or out.is_neg() or lora_a.is_neg() or lora_b.is_neg() or ids.is_neg() or basis_of.is_neg()
                or (sigma is not None and sigma.is_neg()) or (adapter_scale is not None and adapter_scale.is_neg())
                or (ranks is not None and ranks.is_neg())):
            return False
        args = (_to_dlpack(out), out_offset, _to_dlpack(x), _to_dlpack(lora_a), _to_dlpack(lora_b),
                None if sigma is None else _to_dlpack(sigma), _to_dlpack(ids), _to_dlpack(basis_of), scale,
                None if adapter_scale is None else _to_dlpack(adapter_scale),
                None if ranks is None else _to_dlpack(ranks), isa(), _num_threads())
    except _NOT_EXPORTED:
        return False
    return (_LOADED or _module()).shared_basis_lora_from_capsules(*args)


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
    """In-place op of ``lolakernels.reference.shared_basis_lora_`` on CPU tensors that passed
    ``_ops.check_shared_basis_args``: the same C++ entry point as the per-layer call, which takes
    every call those checks let through (an int scale is passed on as a float)."""
    isa()  # a bad LOLA_CPU_ISA raises here with its reason; the entry point would only decline
    if not run_vouched_shared_basis_lora(out, out_offset, x, lora_a, lora_b, sigma, ids, basis_of, float(scale),
                                         adapter_scale, ranks):
        raise RuntimeError(
            "lolakernels._C declined a call that passed the argument checks (a bug: please report the "
            f"shapes, dtypes and strides); x {tuple(x.shape)} {x.dtype} strides {x.stride()}, "
            f"lora_a {tuple(lora_a.shape)}, lora_b {tuple(lora_b.shape)}, out strides {out.stride()}")


def _nf4_weight_args(weight: "Nf4Weight") -> tuple:
    """The raw-pointer weight arguments of the nf4 entry points (lola::Nf4Storage)."""
    return (weight.packed.data_ptr(), weight.numel, weight.blocksize, address(weight.absmax),
            address(weight.absmax_q), address(weight.absmax_code), address(weight.absmax_scale),
            weight.absmax_blocksize, address(weight.absmax_offset))


def dequantize_range(weight: "Nf4Weight", begin: int, count: int, dtype: torch.dtype) -> Tensor:
    """Flat elements [begin, begin + count) of an nf4 weight in ``dtype`` (bit for bit as bitsandbytes)."""
    out = torch.empty(count, dtype=dtype)
    _module().nf4_dequantize(*_nf4_weight_args(weight), begin, count, out.data_ptr(), _NF4_DTYPE_CODE[dtype],
                             isa(), torch.get_num_threads())
    return out


def nf4_dequantize(weight: "Nf4Weight", dtype: torch.dtype) -> Tensor:
    return dequantize_range(weight, 0, weight.numel, dtype).reshape(weight.shape)


def dequantize_rows(weight: "Nf4Weight", row0: int, rows: int, dtype: torch.dtype) -> Tensor:
    k = weight.shape[1]
    return dequantize_range(weight, row0 * k, rows * k, dtype).reshape(rows, k)


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
    """``lolakernels.reference.nf4.nf4_lora_linear`` on validated 2-D CPU tensors: one pass over
    the packed weight with the LoRA / DoRA update in its epilogue."""
    n, k = weight.shape
    m = x.shape[0]
    x_compute = x.to(compute_dtype)
    if x_compute.stride(-1) != 1:
        x_compute = x_compute.contiguous()
    out = torch.empty(m, n, dtype=x.dtype)
    lora_h = dora_scale = None
    # (lora_a, lora_x, its row stride, its dtype code) when the kernel forms the shrink itself.
    shrink_args = (0, 0, 0, 0)
    if lora_a is not None:
        lora_x = x if x_lora is None else x_lora
        if m <= _module().NF4_SHRINK_MAX_TOKENS and lora_a.is_contiguous() and lora_x.stride(-1) == 1:
            # A few tokens: the kernel forms h = x · lora_aᵀ itself (a BLAS call costs more than the product).
            shrink_args = (lora_a.data_ptr(), lora_x.data_ptr(), lora_x.stride(0), _DTYPE_CODE[lora_x.dtype])
        else:
            lora_h = torch.nn.functional.linear(lora_x.to(lora_a.dtype), lora_a).contiguous()
        lora_b = lora_b.contiguous()
        if magnitude is not None:
            dora_scale = (magnitude / weight_norm).float().contiguous()  # the kernel reads fp32
    bias_compute = None if bias is None else bias.to(compute_dtype).contiguous()
    _module().nf4_lora_linear(
        *_nf4_weight_args(weight), n, k, x_compute.data_ptr(), x_compute.stride(0), m, _DTYPE_CODE[compute_dtype],
        address(bias_compute), address(lora_h), address(lora_b), 0 if lora_a is None else lora_a.shape[0],
        float(scale), address(dora_scale), out.data_ptr(), out.stride(0), _DTYPE_CODE[x.dtype], *shrink_args,
        isa(), torch.get_num_threads(),
    )
    return out
