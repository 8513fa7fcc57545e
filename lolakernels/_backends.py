"""Which backend runs an op, and why the others declined.

Order (DESIGN §3): CUDA tensors -> ``cuda`` extension where it supports the case, else ``triton``,
else ``reference``; CPU tensors -> ``cpu`` extension, else ``reference``. ``LOLA_BACKEND`` forces
one backend; asking for one that cannot run the case raises ``RuntimeError`` with the reason.
"""
from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Optional

import torch

BACKEND_NAMES = ("cuda", "triton", "cpu", "reference")
REFERENCE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Case:
    """What a backend needs to know to accept or decline one call."""

    device: torch.device
    dtype: torch.dtype
    num_tokens: int


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


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


@functools.lru_cache(maxsize=4096)
def _decline_reason(name: str, case: Case) -> Optional[str]:
    """None if backend `name` takes this case, else why not."""
    ok, reason = backend_available(name)
    if not ok:
        return reason
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
    name = os.environ.get("LOLA_BACKEND", "").strip().lower()
    if not name:
        return None
    if name not in BACKEND_NAMES:
        raise ValueError(f"LOLA_BACKEND={name!r}: expected one of {BACKEND_NAMES}")
    return name


def select(case: Case) -> str:
    """Name of the backend that runs this case."""
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


def implementation(name: str) -> ModuleType:
    """The module holding backend `name`'s kernels (each defines ``shared_basis_lora_``)."""
    modules = {
        "reference": "lolakernels.reference.shared_basis_lora",
        "cpu": "lolakernels.cpu",
        "triton": "lolakernels.triton.shared_basis_lora",
        "cuda": "lolakernels.cuda",
    }
    return importlib.import_module(modules[name])


def report() -> dict[str, str]:
    """backend name -> 'available' or the reason it cannot run here."""
    return {name: ("available" if ok else reason) for name, (ok, reason) in
            ((name, backend_available(name)) for name in BACKEND_NAMES)}
