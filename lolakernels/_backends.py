"""Which backend runs an op, and why the others declined.

Order (docs/design.md §3): CUDA tensors -> ``cuda`` extension where it supports the case, else ``triton``,
else ``reference``; CPU tensors -> ``cpu`` extension, else ``reference``. ``LOLA_BACKEND`` forces
one backend; asking for one that cannot run the case raises ``RuntimeError`` with the reason.
"""
from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import NamedTuple, Optional

import torch

from . import _env

BACKEND_NAMES = ("cuda", "triton", "cpu", "reference")
REFERENCE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class Case(NamedTuple):
    """What a backend needs to know to accept or decline one call. (A named tuple: every layer of
    a model builds one per call, and a frozen dataclass costs several times as much to build.)"""

    device: torch.device
    dtype: torch.dtype
    num_tokens: int
    # Which op family asks; the nf4 ops also name the dtypes the kernels must read and write
    # (dtype is then the compute dtype: bitsandbytes' compute_dtype, or the dequantized output).
    op: str = "shared_basis_lora"
    out_dtype: Optional[torch.dtype] = None
    lora_dtype: Optional[torch.dtype] = None


def _triton_interpreting() -> bool:
    return _env.read("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def backend_available(name: str) -> tuple[bool, str]:
    """Whether a backend can run at all on this machine, with the reason if not."""
    if name == "reference":
        return True, ""
    if name == "cpu":
        from . import cpu

        return cpu.available()
    if name == "triton":
        try:
            importlib.import_module("triton")
        except ImportError as error:
            return False, f"triton is not installed ({error})"
        if not torch.cuda.is_available() and not _triton_interpreting():
            return False, "no CUDA GPU (set TRITON_INTERPRET=1 before importing lolakernels to run Triton on the CPU)"
        return True, ""
    if name == "cuda":
        try:
            cuda = importlib.import_module("lolakernels.cuda")
        except ImportError as error:
            return False, f"the cuda wrapper cannot load ({error})"
        return cuda.available()
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKEND_NAMES}")


def _dtype_name(dtype: Optional[torch.dtype]) -> str:
    return str(dtype).replace("torch.", "")


def _nf4_decline_reason(name: str, case: Case) -> Optional[str]:
    """None if backend `name` takes this nf4 case (nf4_dequantize or nf4_lora_linear), else why not."""
    if name == "reference":
        return None
    if name == "cpu":
        from .cpu import NF4_DEQUANTIZE_DTYPES, NF4_LINEAR_DTYPES

        if case.device.type != "cpu":
            return f"tensors are on {case.device}, the cpu backend needs CPU tensors"
        if case.op == "nf4_dequantize":
            if case.dtype not in NF4_DEQUANTIZE_DTYPES:
                return f"dtype {_dtype_name(case.dtype)} not supported (cpu dequantizes to float32, bfloat16, float16)"
            return None
        if case.dtype not in NF4_LINEAR_DTYPES or case.out_dtype not in NF4_LINEAR_DTYPES:
            return (f"compute dtype {_dtype_name(case.dtype)} / input dtype {_dtype_name(case.out_dtype)} not "
                    "supported (cpu takes float32, bfloat16)")
        if case.lora_dtype not in (None, torch.float32):
            return f"adapter dtype {_dtype_name(case.lora_dtype)} not supported (cpu takes PEFT's default float32)"
        return None
    if name == "triton":
        try:
            from .triton.nf4 import TRITON_NF4_DTYPES
        except ImportError as error:
            return f"no Triton nf4 kernels ({error})"
        if case.device.type != "cuda" and not (case.device.type == "cpu" and _triton_interpreting()):
            return f"tensors are on {case.device}; triton needs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1)"
        for label, dtype in (("dtype", case.dtype), ("input dtype", case.out_dtype), ("adapter dtype", case.lora_dtype)):
            if dtype is not None and dtype not in TRITON_NF4_DTYPES:
                return f"{label} {_dtype_name(dtype)} not supported (triton takes float32, float16, bfloat16)"
        return None
    if name == "cuda":
        from .cuda import nf4_decline_reason

        if case.device.type != "cuda":
            return f"tensors are on {case.device}, the cuda backend needs CUDA tensors"
        return nf4_decline_reason(case)
    raise ValueError(f"unknown backend {name!r}")


@functools.lru_cache(maxsize=4096)
def _decline_reason(name: str, case: Case) -> Optional[str]:
    """None if backend `name` takes this case, else why not."""
    ok, reason = backend_available(name)
    if not ok:
        return reason
    if case.op.startswith("nf4"):
        return _nf4_decline_reason(name, case)
    dtype_name = str(case.dtype).replace("torch.", "")
    if name == "reference":
        if case.dtype not in REFERENCE_DTYPES:
            return f"dtype {dtype_name} not supported (reference takes float32, float16, bfloat16)"
        return None
    if name == "cpu":
        from .cpu import CPU_DTYPES

        if case.device.type != "cpu":
            return f"tensors are on {case.device}, the cpu backend needs CPU tensors"
        if case.dtype not in CPU_DTYPES:
            return f"dtype {dtype_name} not supported (cpu takes float32, bfloat16)"
        return None
    if name == "triton":
        from .triton.shared_basis_lora import TRITON_DTYPES

        if case.device.type != "cuda" and not (case.device.type == "cpu" and _triton_interpreting()):
            return f"tensors are on {case.device}; triton needs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1)"
        if case.dtype not in TRITON_DTYPES:
            return f"dtype {dtype_name} not supported (triton takes float32, float16, bfloat16)"
        return None
    if name == "cuda":
        from .cuda import CUDA_DTYPES, DECODE_MAX_TOKENS

        if case.device.type != "cuda":
            return f"tensors are on {case.device}, the cuda backend needs CUDA tensors"
        if case.dtype not in CUDA_DTYPES:
            return f"dtype {dtype_name} not supported (cuda takes float16, bfloat16)"
        if case.num_tokens > DECODE_MAX_TOKENS:
            return f"{case.num_tokens} tokens > {DECODE_MAX_TOKENS}: the cuda kernels serve decode batches only"
        return None
    raise ValueError(f"unknown backend {name!r}")


def _default_order(device: torch.device) -> tuple[str, ...]:
    if device.type == "cuda":
        return ("cuda", "triton", "reference")
    return ("cpu", "reference")


def forced_backend() -> Optional[str]:
    name = _env.read("LOLA_BACKEND").strip().lower()
    if not name:
        return None
    if name not in BACKEND_NAMES:
        raise ValueError(f"LOLA_BACKEND={name!r}: expected one of {BACKEND_NAMES}")
    return name


# select()'s answers per (LOLA_BACKEND, case): in a model every layer asks the same question, and
# walking the backends costs more than a small kernel. Keyed on the variable's raw value, so
# setting it between calls still takes effect; refusals are not stored.
_SELECTED: dict[tuple, str] = {}


def select(case: Case) -> str:
    """Name of the backend that runs this case."""
    key = (_env.read("LOLA_BACKEND"), case)
    name = _SELECTED.get(key)
    if name is None:
        name = _select_uncached(case)
        if len(_SELECTED) >= 4096:
            _SELECTED.clear()
        _SELECTED[key] = name
    return name


def _select_uncached(case: Case) -> str:
    forced = forced_backend()
    if forced is not None:
        reason = _decline_reason(forced, case)
        if reason is not None:
            raise RuntimeError(f"LOLA_BACKEND={forced} cannot run this call: {reason}")
        return forced
    reasons = []
    for name in _default_order(case.device):
        reason = _decline_reason(name, case)
        if reason is None:
            return name
        reasons.append(f"{name}: {reason}")
    raise TypeError("no backend can run this call: " + "; ".join(reasons))


_IMPLEMENTATIONS = {
    # shared_basis_lora_ per backend
    "shared_basis_lora": {
        "reference": "lolakernels.reference.shared_basis_lora",
        "cpu": "lolakernels.cpu",
        "triton": "lolakernels.triton.shared_basis_lora",
        "cuda": "lolakernels.cuda",
    },
    # nf4_dequantize, dequantize_rows, nf4_lora_linear per backend
    "nf4": {
        "reference": "lolakernels.reference.nf4",
        "cpu": "lolakernels.cpu",
        "triton": "lolakernels.triton.nf4",
        "cuda": "lolakernels.cuda",
    },
}


@functools.lru_cache(maxsize=None)
def implementation(name: str, family: str = "shared_basis_lora") -> ModuleType:
    """The module holding backend `name`'s kernels of an op family."""
    return importlib.import_module(_IMPLEMENTATIONS[family][name])


def report() -> dict[str, str]:
    """backend name -> 'available' or the reason it cannot run here."""
    return {name: ("available" if ok else reason) for name, (ok, reason) in
            ((name, backend_available(name)) for name in BACKEND_NAMES)}
