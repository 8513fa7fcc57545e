"""Thin wrapper over the pybind11 CPU module ``lolakernels._C`` (raw pointers, no torch ABI)."""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
from torch import Tensor

from ._raw import address, sigma_kind

CPU_DTYPES = (torch.float32, torch.bfloat16)
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1}


def _module():
    try:
        from . import _C
    except ImportError as error:  # pragma: no cover - only on a broken install
        raise ImportError(f"lolakernels._C is not built or cannot load: {error}") from error
    return _C


def available() -> tuple[bool, str]:
    try:
        _module()
    except ImportError as error:
        return False, str(error)
    return True, ""


def isa() -> int:
    """Instruction set the kernels use: the best this CPU has, or ``LOLA_CPU_ISA`` if set."""
    return _isa_for(os.environ.get("LOLA_CPU_ISA", "").strip().lower())


@functools.lru_cache(maxsize=None)
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
    """In-place op of ``lolakernels.reference.shared_basis_lora_`` on validated CPU tensors."""
    num_clusters, rank, d_in = lora_a.shape
    _module().shared_basis_lora(
        out.data_ptr(), out.stride(0), out_offset,
        x.data_ptr(), x.stride(0),
        lora_a.data_ptr(), lora_b.data_ptr(),
        address(sigma), sigma_kind(sigma),
        ids.data_ptr(), basis_of.data_ptr(), float(scale),
        address(adapter_scale), address(ranks),
        x.shape[0], d_in, lora_b.shape[1], rank, basis_of.shape[0], num_clusters,
        _DTYPE_CODE[x.dtype], isa(), torch.get_num_threads(),
    )
