"""Per-layer LoRA calls of a serving engine: ``add_lora(out, x, slot, batch)``.

A ``LoraSlot`` holds every adapter's weights for one projection of one layer, split by output
slices so that a fused projection (qkv, gate_up) is one slot. For output slice j of width n_j at
column offset o_j, and token t with adapter ``a = batch.token_adapter_ids[t]`` (-1: nothing added):

    out[t, o_j : o_j + n_j] += expand_j( Σ_{a,j} · shrink_j(x[t]) )
    shrink_j(x) = lora_a_j[c] · x         lora_a_j [C_j, R_j, d_in]     (vLLM: lora_a_stacked)
    expand_j(h) = lora_b_j[c] · h         lora_b_j [C_j, n_j, R_j]      (vLLM: lora_b_stacked)

with ``c = basis_of_j[a]``. Σ is the adapter's core in a shared-basis bank ([N, R] diagonal or
[N, R, R] full) or ``scale_j[a] · I`` for plain stacked adapters (C = N). Each slice is one fused
shrink → core → expand launch (``shared_basis_lora`` / ``multi_lora``) whose shape depends only on
x and the weights, never on the ids: CUDA-graph capturable and ``torch.compile(fullgraph=True)``
traceable. This is vLLM's ``add_lora_linear(y, x, lora_a_stacked, lora_b_stacked, scale,
output_slices)``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from ..ops import multi_lora, shared_basis_lora
from .batch import LoraBatch


class LoraSlice(NamedTuple):
    """One output slice's weights for every adapter (shapes in the module docstring).

    ``sigma`` set: a shared-basis bank slice (``basis_of`` required when C > 1). ``sigma`` None:
    plain stacked adapters, C = N, with PEFT's scaling in ``scale [N]`` and true ``ranks [N]``.
    """

    lora_a: Tensor
    lora_b: Tensor
    sigma: Optional[Tensor] = None
    basis_of: Optional[Tensor] = None
    scale: Optional[Tensor] = None
    ranks: Optional[Tensor] = None

    @property
    def num_adapters(self) -> int:
        if self.sigma is not None:
            return self.sigma.shape[0]
        return self.lora_a.shape[0]

    def to(self, dtype: Optional[torch.dtype] = None, device=None) -> "LoraSlice":
        """Float weights in ``dtype`` on ``device``; index tensors and ``scale`` keep their dtype."""
        def move(tensor, keep_dtype=False):
            if tensor is None:
                return None
            return tensor.to(device=device, dtype=None if keep_dtype else dtype).contiguous()

        return LoraSlice(move(self.lora_a), move(self.lora_b), move(self.sigma), move(self.basis_of, True),
                         move(self.scale, True), move(self.ranks, True))


class LoraSlot:
    """Every adapter's LoRA weights for one (possibly fused) projection, by output slices.

    Args:
        slices: one ``LoraSlice`` per output slice, or None for a slice no adapter touches.
        output_slices: the width n_j of each slice (vLLM's ``output_slices``); may be omitted when
            every slice is given (then ``lora_b.shape[1]``).

    All given slices share d_in, the number of adapters N, the float dtype and the device.
    """

    def __init__(self, slices: Sequence[Optional[LoraSlice]], output_slices: Optional[Sequence[int]] = None):
        slices = tuple(slices)
        if not slices:
            raise ValueError("slices must hold at least one LoraSlice")
        if output_slices is None:
            if any(s is None for s in slices):
                raise ValueError("output_slices is required when a slice is None (its width is unknown)")
            output_slices = [s.lora_b.shape[1] for s in slices]
        output_slices = tuple(int(n) for n in output_slices)
        if len(output_slices) != len(slices):
            raise ValueError(f"output_slices has {len(output_slices)} widths for {len(slices)} slices")
        present = [s for s in slices if s is not None]
        if not present:
            raise ValueError("at least one slice must hold weights")
        first = present[0]
        for j, (s, width) in enumerate(zip(slices, output_slices)):
            if s is None:
                continue
            if s.lora_a.dim() != 3 or s.lora_b.dim() != 3:
                raise ValueError(f"slice {j}: lora_a must be [C, R, d_in] and lora_b [C, n_j, R], got "
                                 f"{list(s.lora_a.shape)} and {list(s.lora_b.shape)}")
            if s.lora_b.shape[1] != width:
                raise ValueError(f"slice {j}: lora_b has {s.lora_b.shape[1]} output rows, output_slices says {width}")
            if s.lora_a.shape[2] != first.lora_a.shape[2]:
                raise ValueError(f"slice {j}: d_in {s.lora_a.shape[2]} differs from slice 0's {first.lora_a.shape[2]}")
            if s.num_adapters != first.num_adapters:
                raise ValueError(f"slice {j}: {s.num_adapters} adapters, slice 0 has {first.num_adapters}")
            if s.lora_a.dtype != first.lora_a.dtype or s.lora_a.device != first.lora_a.device:
                raise ValueError(f"slice {j}: dtype/device {s.lora_a.dtype}/{s.lora_a.device} differ from "
                                 f"{first.lora_a.dtype}/{first.lora_a.device}")
            if s.sigma is not None and s.basis_of is None and s.lora_a.shape[0] != 1:
                raise ValueError(f"slice {j}: basis_of is required with C = {s.lora_a.shape[0]} bases")
            if s.basis_of is not None and s.basis_of.numel() and (
                    int(s.basis_of.min()) < 0 or int(s.basis_of.max()) >= s.lora_a.shape[0]):
                raise ValueError(f"slice {j}: basis_of must lie in [0, {s.lora_a.shape[0]})")
        self.slices = slices
        self.output_slices = output_slices
        self.num_adapters = first.num_adapters
        self.in_features = first.lora_a.shape[2]
        self.out_features = sum(output_slices)
        self.dtype = first.lora_a.dtype
        self.device = first.lora_a.device

    def __repr__(self) -> str:
        return (f"LoraSlot(output_slices={self.output_slices}, d_in={self.in_features}, adapters={self.num_adapters}, "
                f"dtype={self.dtype}, device={self.device})")

    def to(self, dtype: Optional[torch.dtype] = None, device=None) -> "LoraSlot":
        return LoraSlot([s.to(dtype, device) if s is not None else None for s in self.slices], self.output_slices)

    @classmethod
    def from_bank(cls, bank, slots: Union[str, Sequence[str]], *, output_sizes: Optional[Sequence[int]] = None,
                  dtype: torch.dtype = torch.float32, device=None) -> "LoraSlot":
        """The weights of ``bank`` (an AdapterBank) for one module path, or several fused in order
        (e.g. the q, k, v paths of a layer for its fused qkv projection). A path the bank does not
        hold becomes an empty slice of width ``output_sizes[j]``."""
        names = [slots] if isinstance(slots, str) else list(slots)
        sizes = list(output_sizes) if output_sizes is not None else [None] * len(names)
        if len(sizes) != len(names):
            raise ValueError(f"output_sizes has {len(sizes)} entries for {len(names)} slots")
        held = set(bank.slots)
        slices, widths = [], []
        for name, size in zip(names, sizes):
            if name not in held:
                if size is None:
                    raise ValueError(f"slot {name!r} is not in the bank; pass its width in output_sizes")
                slices.append(None)
                widths.append(int(size))
                continue
            weights = bank.slot_weights(name, dtype=dtype, device=device)
            slices.append(LoraSlice(weights.lora_a, weights.lora_b, weights.sigma, weights.basis_of))
            widths.append(weights.lora_b.shape[1])
        return cls(slices, widths)

    @classmethod
    def from_stacked(cls, lora_a: Tensor, lora_b: Tensor, scale: Union[float, Tensor] = 1.0,
                     ranks: Optional[Tensor] = None) -> "LoraSlot":
        """Plain (uncompressed) adapters: ``lora_a [N, r, d_in]``, ``lora_b [N, d_out, r]`` (PEFT's
        layouts stacked, zero-padded to a common r), PEFT's scaling as ``scale`` (float or [N])."""
        if lora_a.dim() != 3:
            raise ValueError(f"lora_a must be [N, r, d_in], got shape {list(lora_a.shape)}")
        count = lora_a.shape[0]
        if not isinstance(scale, Tensor):
            scale = torch.full((count,), float(scale), dtype=torch.float32, device=lora_a.device)
        ranks = ranks.to(torch.int32) if ranks is not None else None
        return cls([LoraSlice(lora_a.contiguous(), lora_b.contiguous(), None, None, scale.float().contiguous(), ranks)])


def add_lora(out: Tensor, x: Tensor, slot: LoraSlot, batch: LoraBatch) -> Tensor:
    """``out[t, o_j:o_j+n_j] += expand_j(Σ_a shrink_j(x[t]))`` for every slice j of ``slot`` and token t,
    with ``a = batch.token_adapter_ids[t]`` (see the module docstring). In place; returns ``out``.

    Args:
        out: ``[T, Σ_j n_j]`` the (fused) projection's base output, in x's dtype.
        x: ``[T, d_in]`` the projection's input; T ≤ ``batch.max_tokens``.
        slot: the layer's weights (``slot.num_adapters`` must equal ``batch.num_adapters``).
        batch: this step's ``LoraBatch``; ids were checked by ``prepare``, so nothing here reads
            device data.
    """
    if x.dim() != 2 or out.dim() != 2:
        raise ValueError(f"x must be [T, d_in] and out [T, d_out], got shapes {list(x.shape)} and {list(out.shape)}")
    if x.shape[0] != out.shape[0]:
        raise ValueError(f"x has {x.shape[0]} tokens but out has {out.shape[0]}")
    if x.shape[0] > batch.max_tokens:
        raise ValueError(f"x has {x.shape[0]} tokens > max_tokens = {batch.max_tokens} of the LoraBatch")
    if x.shape[1] != slot.in_features:
        raise ValueError(f"x has d_in = {x.shape[1]} but the slot's adapters take {slot.in_features}")
    if out.shape[1] != slot.out_features:
        raise ValueError(f"out has {out.shape[1]} columns but the slot's output_slices {slot.output_slices} "
                         f"add up to {slot.out_features}")
    if slot.num_adapters != batch.num_adapters:
        raise ValueError(f"the slot holds {slot.num_adapters} adapters but the LoraBatch was built for "
                         f"{batch.num_adapters}")
    ids = batch.token_adapter_ids[:x.shape[0]]
    offset = 0
    for lora_slice, width in zip(slot.slices, slot.output_slices):
        if lora_slice is not None:
            if lora_slice.sigma is None:
                multi_lora(x, lora_slice.lora_a, lora_slice.lora_b, ids, scale=lora_slice.scale,
                           ranks=lora_slice.ranks, out=out, out_slice=(offset, width), validate=False)
            else:
                shared_basis_lora(x, lora_slice.lora_a, lora_slice.lora_b, lora_slice.sigma, ids,
                                  basis_of=lora_slice.basis_of, out=out, out_slice=(offset, width), validate=False)
        offset += width
    return out


__all__ = ["LoraSlice", "LoraSlot", "add_lora"]
