"""Argument checks shared by every op: wrong input raises ValueError/TypeError naming the argument,
before any kernel runs."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

INDEX_DTYPES = (torch.int32,)


def _shape(tensor: Tensor) -> str:
    return "[" + ", ".join(str(size) for size in tensor.shape) + "]"


def require_dims(name: str, tensor: Tensor, dims: int, layout: str) -> None:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(tensor).__name__}")
    if tensor.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D {layout}, got shape {_shape(tensor)}")


def require_size(name: str, tensor: Tensor, dim: int, expected: int, meaning: str) -> None:
    if tensor.shape[dim] != expected:
        raise ValueError(
            f"{name}.shape[{dim}] = {tensor.shape[dim]} but {meaning} is {expected} (shape {_shape(tensor)})"
        )


def require_dtype(name: str, tensor: Tensor, allowed: Sequence[torch.dtype], why: str = "") -> None:
    if tensor.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name} has dtype {str(tensor.dtype).replace('torch.', '')}; expected {names}{why}")


def require_same_device(named: dict[str, Optional[Tensor]]) -> torch.device:
    devices = {name: t.device for name, t in named.items() if t is not None}
    first_name, first = next(iter(devices.items()))
    for name, device in devices.items():
        if device != first:
            raise ValueError(f"{name} is on {device} but {first_name} is on {first}: all tensors must share a device")
    return first


def require_contiguous(name: str, tensor: Optional[Tensor]) -> None:
    if tensor is not None and not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous (got strides {tuple(tensor.stride())}); call .contiguous() once and keep it")


def require_not_negated(name: str, tensor: Optional[Tensor]) -> None:
    """For tensors an op writes: a lazily negated view (``is_neg()``, e.g. ``z.conj().imag``) has no
    storage holding its values, so it cannot be written through a pointer."""
    if tensor is not None and tensor.is_neg():
        raise ValueError(f"{name} is a lazily negated view (is_neg() is True); write into a tensor that holds its "
                         "values, e.g. one from .resolve_neg()")


def resolve_negated(*tensors: Optional[Tensor]) -> tuple:
    """The tensors with any lazy negation applied (``resolve_neg``: a copy only where the bit is set),
    because the kernels read storage through pointers and DLPack, which carry no negative bit."""
    return tuple(None if t is None else t.resolve_neg() for t in tensors)


def require_unit_inner_stride(name: str, tensor: Tensor) -> None:
    if tensor.shape[-1] > 1 and tensor.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride in its last dimension (got strides {tuple(tensor.stride())})")


def _byte_span(tensor: Tensor) -> tuple[int, int]:
    """[first, last) bytes the tensor's elements occupy (torch strides are non-negative)."""
    first = tensor.data_ptr()
    if tensor.numel() == 0:
        return first, first
    last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    return first, first + (last + 1) * tensor.element_size()


def require_no_overlap(name: str, written: Tensor, read: dict[str, Optional[Tensor]]) -> None:
    """A tensor an op writes may not share memory with the tensors it reads while writing, nor
    have rows that share memory (an expanded view)."""
    if written.dim() == 2 and written.shape[0] > 1 and written.stride(0) < written.shape[1]:
        raise ValueError(f"{name}'s rows overlap in memory (shape {list(written.shape)}, strides "
                         f"{tuple(written.stride())}, e.g. an expand()ed view); write into a tensor with a row of its own "
                         "per token")
    first, last = _byte_span(written)
    for other_name, other in read.items():
        if other is None or first == last:
            continue
        other_first, other_last = _byte_span(other)
        if other_first < other_last and first < other_last and other_first < last:
            raise ValueError(f"{name} shares memory with {other_name}, which the op reads while it writes {name}")


def require_in_range(name: str, tensor: Tensor, low: int, high: int, range_text: str) -> None:
    """Checks low <= tensor <= high elementwise; reads the data (a device sync on GPU)."""
    if tensor.numel() == 0:
        return
    smallest, largest = (int(v) for v in torch.aminmax(tensor))
    if smallest < low or largest > high:
        bad = smallest if smallest < low else largest
        position = int(((tensor < low) | (tensor > high)).nonzero()[0, 0])
        raise ValueError(f"{name}[{position}] = {bad} is outside {range_text}")
