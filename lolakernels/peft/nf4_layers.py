"""Drop-in layers for QLoRA models, backed by ``lolakernels.nf4_lora_linear``.

Each class subclasses the class it replaces and adds no state of its own: it is installed on an
existing layer with ``layer.__class__ = LoraLinear4bit`` and removed with
``layer.__class__ = LoraLinear4bit.replaces``. Only ``forward`` is overridden; merge/unmerge,
scaling, set_adapter, disable_adapters, state-dict keys and saving are PEFT's / bitsandbytes' own.
Cases the fused op does not implement (fp4 or repacked weights, aLoRA / Arrow variants, lora_bias,
autocast, DoRA with dropout in training, several adapters with DoRA, extra forward arguments) run
the original ``forward``.
"""
from __future__ import annotations

from typing import Optional

import bitsandbytes as bnb
import torch
from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit
from peft.tuners.lora.variants import DoraLinearVariant
from torch import Tensor

from ..ops.nf4 import nf4_lora_linear
from ..ops.shared_basis_lora import multi_lora


def _repacked(quant_state) -> bool:
    return bool(getattr(quant_state, "packing_format_for_cpu", False))


def _base_readable(base, x: Tensor) -> bool:
    """Whether the fused op reads this bitsandbytes layer exactly (else its own forward runs)."""
    if not isinstance(base, bnb.nn.Linear4bit) or not isinstance(x, Tensor):
        return False
    quant_state = getattr(base.weight, "quant_state", None)
    if quant_state is None or quant_state.quant_type != "nf4" or _repacked(quant_state):
        return False
    shape = tuple(quant_state.shape)
    return len(shape) == 2 and x.dim() >= 1 and x.shape[-1] == shape[1] and x.device == base.weight.device


def _compute_dtype(base, x: Tensor) -> torch.dtype:
    """bitsandbytes' compute dtype of the layer for this input (it fixes it on the first call)."""
    if not base.compute_type_is_set:
        base.set_compute_type(x)
        base.compute_type_is_set = True
    return base.compute_dtype if base.compute_dtype is not None else x.dtype


class Linear4bit(bnb.nn.Linear4bit):
    """bitsandbytes' ``Linear4bit`` (nf4) with the base product from lolakernels."""

    replaces = bnb.nn.Linear4bit

    def forward(self, x: Tensor) -> Tensor:
        bnb.nn.modules.fix_4bit_weight_quant_state_from_module(self)
        if not _base_readable(self, x):
            return super().forward(x)
        return nf4_lora_linear(x, self.weight, self.weight.quant_state, None, None, 0.0, bias=self.bias,
                               compute_dtype=_compute_dtype(self, x))


class LoraLinear4bit(PeftLinear4bit):
    """PEFT's ``lora.bnb.Linear4bit`` (LoRA or DoRA on an nf4 base) with the base product and the
    adapter fused into one lolakernels op; mixed-adapter batches use ``lolakernels.multi_lora``."""

    replaces = PeftLinear4bit

    def _lola_supported_adapter(self, name: str) -> bool:
        variant = self.lora_variant.get(name) if hasattr(self, "lora_variant") else None
        if variant is not None and not isinstance(variant, DoraLinearVariant):
            return False
        return not self.lora_bias.get(name, False)

    def _lola_dropout_p(self, name: str) -> float:
        dropout = self.lora_dropout[name]
        return float(dropout.p) if isinstance(dropout, torch.nn.Dropout) and self.training else 0.0

    def _lola_can_run(self, x: Tensor, args, kwargs) -> bool:
        if args or set(kwargs) - {"adapter_names"} or self.disable_adapters or self.merged:
            return False
        if torch.is_autocast_enabled() or not getattr(self, "cast_input_dtype_enabled", True):
            return False
        return _base_readable(self.get_base_layer(), x)

    def _lola_check_repacked_dora(self) -> None:
        quant_state = getattr(self.get_base_layer().weight, "quant_state", None)
        if quant_state is not None and _repacked(quant_state) and any(
                self.use_dora.get(name, False) for name in self.active_adapters):
            raise ValueError(
                "the base layer's nf4 weight was repacked in place by bitsandbytes' AVX512-BF16 CPU inference path "
                "(quant_state.packing_format_for_cpu); DoRA needs the dequantized weight, which cannot be read "
                "exactly from that layout. Run DoRA layers before any eval-mode forward of the plain bitsandbytes "
                "layer, or keep it in train mode.")

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        self._check_forward_args(x, *args, **kwargs)
        if not self._lola_can_run(x, args, kwargs):
            self._lola_check_repacked_dora()
            return super().forward(x, *args, **kwargs)
        adapter_names = kwargs.get("adapter_names")
        if adapter_names is not None:
            result = self._lola_mixed_batch(x, adapter_names)
            return super().forward(x, *args, **kwargs) if result is None else result
        active = [name for name in self.active_adapters if name in self.lora_A]
        if not all(self._lola_supported_adapter(name) for name in active):
            return super().forward(x, *args, **kwargs)
        dora = [name for name in active if self.use_dora.get(name, False)]
        if dora and (len(active) > 1 or self._lola_dropout_p(dora[0]) > 0):
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        compute_dtype = _compute_dtype(base, x)
        quant_state = base.weight.quant_state
        if not active:
            return nf4_lora_linear(x, base.weight, quant_state, None, None, 0.0, bias=base.bias,
                                   compute_dtype=compute_dtype)
        first, rest = active[0], active[1:]
        magnitude = self.lora_magnitude_vector[first].weight if first in dora else None
        result = nf4_lora_linear(x, base.weight, quant_state, self.lora_A[first].weight, self.lora_B[first].weight,
                                 self.scaling[first], bias=base.bias, magnitude=magnitude,
                                 dropout_p=self._lola_dropout_p(first), compute_dtype=compute_dtype)
        for name in rest:  # further plain adapters, summed as PEFT does
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            output = lora_b(lora_a(self.lora_dropout[name](x.to(lora_a.weight.dtype)))) * self.scaling[name]
            result = result + output.to(result.dtype)
        return result

    def _lola_mixed_batch(self, x: Tensor, adapter_names: list[str]) -> Optional[Tensor]:
        """PEFT's adapter_names= batch: one nf4 product for all rows, then every row's adapter in one
        multi_lora call. None when a case is left to PEFT."""
        used = sorted({name for name in adapter_names if name in self.lora_A})
        if any(not self._lola_supported_adapter(name) or self._lola_dropout_p(name) > 0 for name in used):
            return None
        dtypes = {self.lora_A[name].weight.dtype for name in used} | {self.lora_B[name].weight.dtype for name in used}
        if len(dtypes) > 1:
            return None
        base = self.get_base_layer()
        result = nf4_lora_linear(x, base.weight, base.weight.quant_state, None, None, 0.0, bias=base.bias,
                                 compute_dtype=_compute_dtype(base, x))
        if not used:
            return result
        lora_dtype = dtypes.pop()
        rank = max(self.lora_A[name].weight.shape[0] for name in used)
        lora_a = torch.stack([torch.nn.functional.pad(self.lora_A[name].weight,
                                                      (0, 0, 0, rank - self.lora_A[name].weight.shape[0]))
                              for name in used])
        lora_b = torch.stack([torch.nn.functional.pad(self.lora_B[name].weight,
                                                      (0, rank - self.lora_B[name].weight.shape[1]))
                              for name in used])
        ranks = torch.tensor([self.lora_A[name].weight.shape[0] for name in used], dtype=torch.int32,
                             device=x.device)
        scales = torch.tensor([float(self.scaling[name]) for name in used], dtype=torch.float32, device=x.device)
        index = {name: i for i, name in enumerate(used)}
        per_row = torch.tensor([index.get(name, -1) for name in adapter_names], dtype=torch.int32, device=x.device)
        tokens_per_row = x[0].numel() // x.shape[-1] if x.dim() > 1 else 1
        ids = per_row.repeat_interleave(tokens_per_row)
        x_lora = x.reshape(-1, x.shape[-1]).to(lora_dtype)
        term = multi_lora(x_lora, lora_a, lora_b, ids, scale=scales, ranks=ranks)
        flat = result.reshape(-1, result.shape[-1])
        return (flat + term.to(result.dtype)).reshape(result.shape)
