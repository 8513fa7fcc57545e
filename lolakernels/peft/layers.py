"""``LoraLinear``: PEFT's ``lora.Linear`` with its LoRA term computed by ``lolakernels.multi_lora``.

Installed on an existing PEFT layer by ``layer.__class__ = LoraLinear`` (see ``patch.accelerate``)
and removed by assigning ``LoraLinear.replaces`` back. It adds no state of its own: everything
but ``forward`` (merge/unmerge, scaling, set_adapter, disable_adapters, state_dict keys,
save_pretrained) is PEFT's, so PEFT's numbers and files are unchanged.

For input ``x [..., d_in]`` and base output ``y = W x (+ bias)``:

* active adapters (no ``adapter_names``):  ``y += Σ_{a active} scaling[a] · B_a A_a dropout_a(x)``,
  one ``multi_lora`` launch per active adapter on views of its weights (no copy);
* mixed batch (``adapter_names=[name per row]``): ``y[row] += scaling[a] · B_a A_a x[row]`` with
  ``a = adapter_names[row]`` (``"__base__"`` rows untouched), one ``multi_lora`` launch over every
  row instead of PEFT's loop over the distinct adapters.

Dropout in training calls PEFT's own dropout modules on the same tensors in the same order, so
the random masks (and therefore the results) equal PEFT's. Disabled adapters, merged weights
and variants this layer does not implement (DoRA, aLoRA, Arrow, ... any ``lora_variant``) and
``lora_bias`` run ``super().forward``, logged once per reason.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from peft.tuners.lora import layer as peft_lora_layer
from torch import Tensor

from ..ops import multi_lora
from .adapter_stack import BASE_ADAPTER, log_fallback_once, stacked_adapters, token_adapter_ids


def unsupported_adapter_reason(layer, names: Sequence[str]) -> Optional[str]:
    """Why the adapters ``names`` of ``layer`` cannot run on the lolakernels path, or None."""
    for name in names:
        variant = layer.lora_variant.get(name)
        if variant is not None:
            return f"adapter {name!r} uses the LoRA variant {type(variant).__name__}"
        if layer.lora_bias.get(name, False):
            return f"adapter {name!r} has lora_bias=True"
    dtypes = {(layer.lora_A[n].weight.dtype, layer.lora_B[n].weight.dtype) for n in names}
    if len(dtypes) > 1 or any(a != b for a, b in dtypes):
        return "the adapters' weights have different dtypes"
    return None


def _extra_arguments_reason(args: tuple, kwargs: dict) -> Optional[str]:
    extra = [key for key, value in kwargs.items() if key != "adapter_names" and value is not None]
    if args or extra:
        return f"forward got arguments other than x and adapter_names ({extra or 'positional'})"
    return None


def _needs_grad(x: Tensor, layer, names: Sequence[str]) -> bool:
    if not torch.is_grad_enabled():
        return False
    return x.requires_grad or any(
        layer.lora_A[n].weight.requires_grad or layer.lora_B[n].weight.requires_grad for n in names)


def _rows(tensor: Tensor, features: int) -> Tensor:
    """``[..., features]`` as ``[tokens, features]`` (a view when the layout allows)."""
    return tensor.reshape(-1, features)


class LoraLinear(peft_lora_layer.Linear):
    """``peft.tuners.lora.Linear`` served by ``lolakernels.multi_lora`` (see the module docstring)."""

    replaces = peft_lora_layer.Linear

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        outcome = self._lola_forward(x, args, kwargs)
        if isinstance(outcome, Tensor):
            return outcome
        if outcome is not None:
            log_fallback_once(outcome)
        return super().forward(x, *args, **kwargs)

    def _lola_forward(self, x: Tensor, args: tuple, kwargs: dict) -> Union[Tensor, str, None]:
        """The layer's output, or why PEFT's forward must run instead (None: PEFT's path only
        runs the base layer, as when adapters are disabled or merged)."""
        reason = _extra_arguments_reason(args, kwargs)
        if reason is not None:
            return reason
        if self.disable_adapters:
            return None
        adapter_names = kwargs.get("adapter_names")
        if adapter_names is not None:
            self._check_forward_args(x, adapter_names=adapter_names)
            return self._mixed_batch_lola(x, adapter_names)
        if self.merged:
            return None
        return self._active_adapters_lola(x)

    def _active_adapters_lola(self, x: Tensor) -> Union[Tensor, str]:
        names = [name for name in self.active_adapters if name in self.lora_A]
        if not names:
            return self.base_layer(x)
        reason = unsupported_adapter_reason(self, names)
        if reason is not None:
            return reason
        lora_dtype = self.lora_A[names[0]].weight.dtype
        x_lora = self._cast_input_dtype(x, lora_dtype)
        if x_lora.dtype != lora_dtype:
            return "input dtype casting is disabled and x's dtype differs from the adapters'"
        if self.lora_A[names[0]].weight.device != x.device:
            return "the adapters live on another device than the input"
        result = self.base_layer(x)
        result_dtype = result.dtype
        # PEFT adds each term to the running result with type promotion and rounds once at the end.
        accumulated = result.to(torch.promote_types(result_dtype, lora_dtype))
        accumulated_rows = _rows(accumulated, self.out_features)
        ids = None
        for name in names:
            x_rows = _rows(self.lora_dropout[name](x_lora), self.in_features)
            if ids is None:
                ids = torch.zeros(x_rows.shape[0], dtype=torch.int32, device=x.device)
            # Views, no copy; weights made by SVD merges can be transposed views and need one.
            lora_a = self.lora_A[name].weight.contiguous().unsqueeze(0)
            lora_b = self.lora_B[name].weight.contiguous().unsqueeze(0)
            scaling = float(self.scaling[name])
            if accumulated.dtype == lora_dtype:
                multi_lora(x_rows, lora_a, lora_b, ids, scale=scaling, out=accumulated_rows, validate=False)
            else:
                term = multi_lora(x_rows, lora_a, lora_b, ids, scale=scaling, validate=False)
                accumulated_rows = accumulated_rows + term
        return accumulated_rows.reshape(result.shape).to(result_dtype)

    def _mixed_batch_lola(self, x: Tensor, adapter_names: Sequence[str]) -> Union[Tensor, str]:
        # PEFT iterates this set; the dropout mirror below needs its exact order.
        distinct = set(adapter_names)
        used = [name for name in distinct if name != BASE_ADAPTER and name in self.lora_A]
        if not used:
            return self.base_layer(x)
        reason = unsupported_adapter_reason(self, used)
        if reason is not None:
            return reason
        lora_dtype = self.lora_A[used[0]].weight.dtype
        if self.lora_A[used[0]].weight.device != x.device:
            return "the adapters live on another device than the input"
        result = self.base_layer(x)
        x_lora = x.to(lora_dtype)
        if self.training and any(not isinstance(self.lora_dropout[n], torch.nn.Identity) for n in used):
            x_lora = self._mirror_mixed_batch_dropout(x_lora, adapter_names, distinct)
        stack = stacked_adapters(self, lora_dtype, differentiable=_needs_grad(x, self, used))
        num_rows = x.shape[0]
        tokens_per_row = x.numel() // max(1, num_rows * self.in_features)
        ids = token_adapter_ids(adapter_names, stack, tokens_per_row, x.device)
        x_rows = _rows(x_lora, self.in_features)
        result_rows = _rows(result, self.out_features)
        if result.dtype == lora_dtype:
            multi_lora(x_rows, stack.lora_a, stack.lora_b, ids, scale=stack.scale, ranks=stack.ranks,
                       out=result_rows, validate=False)
            return result_rows.reshape(result.shape)
        # PEFT rounds each row's term to the result dtype before adding it.
        term = multi_lora(x_rows, stack.lora_a, stack.lora_b, ids, scale=stack.scale, ranks=stack.ranks,
                          validate=False)
        return (result_rows + term.to(result.dtype)).reshape(result.shape)

    def _mirror_mixed_batch_dropout(self, x_lora: Tensor, adapter_names: Sequence[str], distinct: set) -> Tensor:
        """Each adapter's dropout applied to its rows, in PEFT's order (same RNG draws)."""
        dropped = x_lora.clone()
        for name in distinct:
            if name == BASE_ADAPTER or name not in self.lora_A:
                continue
            rows = [i for i, item in enumerate(adapter_names) if item == name]
            dropped[rows] = self.lora_dropout[name](x_lora[rows])
        return dropped
