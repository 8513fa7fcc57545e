"""``attach_bank``: a transformers model serves every adapter of an AdapterBank in one batch.

For each slot of the bank (an adapted linear layer ``y = W x (+ b)``, dense or bitsandbytes
4-bit), token t of sequence s gets

    y[t] += lora_b[c] · Σ_a · lora_a[c] · x[t],    a = adapter_ids[s] (-1: nothing), c = basis_of[a]

(PEFT's scaling is folded into the bank). ``model(input_ids, adapter_ids=...)`` and
``model.generate(..., adapter_ids=...)`` take one id (or adapter name) per sequence. A forward
pre-hook on the model turns them into a ``lolakernels.serving.LoraBatch`` once per forward call
(per-token ids, one host-to-device copy); each slot's forward hook reads it and calls
``lolakernels.serving.add_lora``, so no layer syncs with the host. ``generate`` passes the ids to
every step, the KV-cached decode steps (one token per sequence) included.
"""
from __future__ import annotations

import types
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..serving.batch import LoraBatch
from ..serving.layers import LoraSlot, add_lora

_STATE_ATTRIBUTE = "_lola_bank_serving"
BASE_ADAPTER = "__base__"

AdapterIds = Union[int, str, Sequence[Union[int, str]], Tensor]


class _BankServing:
    """What attach_bank keeps on the model: the bank, its slots' weights per dtype/device, the
    hook handles, and the LoraBatch of the forward call in progress."""

    def __init__(self, bank, modules: dict[str, nn.Module]):
        self.bank = bank
        self.modules = modules
        self.slot_weights: dict[tuple[str, torch.dtype, torch.device], LoraSlot] = {}
        self.handles: list = []
        self.lora_batch: Optional[LoraBatch] = None
        self.batch: Optional[LoraBatch] = None  # set only during a forward call with adapter ids
        self.generate_ids: Optional[Tensor] = None
        self.previous_generate = None
        self.had_own_generate = False

    def slot(self, name: str, dtype: torch.dtype, device: torch.device) -> LoraSlot:
        key = (name, dtype, device)
        slot = self.slot_weights.get(key)
        if slot is None:
            slot = LoraSlot.from_bank(self.bank, name, dtype=dtype, device=device)
            self.slot_weights[key] = slot
        return slot

    def resolve(self, adapter_ids: AdapterIds) -> Tensor:
        """Per-sequence int64 ids on the host from ints, adapter names (``"__base__"`` = -1) or a tensor."""
        names = self.bank.adapter_names
        if isinstance(adapter_ids, (int, str)) and not isinstance(adapter_ids, bool):
            adapter_ids = [adapter_ids]
        if isinstance(adapter_ids, Tensor):
            if adapter_ids.dtype.is_floating_point or adapter_ids.dtype == torch.bool:
                raise TypeError(f"adapter_ids must hold integers, got a {adapter_ids.dtype} tensor")
            ids = adapter_ids.detach().to("cpu", torch.int64).reshape(-1)
        else:
            values = []
            for item in adapter_ids:
                if isinstance(item, str):
                    if item == BASE_ADAPTER:
                        values.append(-1)
                    elif item in names:
                        values.append(names.index(item))
                    else:
                        raise ValueError(f"adapter_ids: {item!r} is not an adapter of the bank (adapters: "
                                         f"{names[:8]}{' ...' if len(names) > 8 else ''}; '__base__' = base model)")
                elif isinstance(item, int) and not isinstance(item, bool):
                    values.append(item)
                else:
                    raise TypeError(f"adapter_ids must hold ints or adapter names, got {item!r}")
            ids = torch.tensor(values, dtype=torch.int64)
        if ids.numel() and (ids.min() < -1 or ids.max() >= len(names)):
            bad = ids[(ids < -1) | (ids >= len(names))][0].item()
            raise ValueError(f"adapter_ids must lie in [-1, {len(names)}) (-1 = base model; the bank holds "
                             f"{len(names)} adapters), got {bad}")
        return ids

    def prepare(self, ids: Tensor, batch_size: int, seq_len: int, device: torch.device,
                expandable: bool) -> LoraBatch:
        if ids.numel() == 1 and batch_size > 1:
            ids = ids.expand(batch_size)
        elif ids.numel() != batch_size:
            # generate() repeats each sequence num_beams / num_return_sequences times in a row.
            if not (expandable and ids.numel() and batch_size % ids.numel() == 0):
                raise ValueError(f"adapter_ids has {ids.numel()} entries but the batch has {batch_size} sequences "
                                 "(one id per sequence, or one id for all)")
            ids = ids.repeat_interleave(batch_size // ids.numel())
        num_tokens = batch_size * seq_len
        current = self.lora_batch
        if (current is None or current.max_tokens < num_tokens or current.max_sequences < batch_size
                or current.device != device):
            capacity = max(num_tokens, 2 * current.max_tokens if current is not None else 0)
            current = LoraBatch(capacity, len(self.bank.adapter_names), max_sequences=max(batch_size, capacity),
                                device=device)
            self.lora_batch = current
        return current.prepare(ids, [seq_len] * batch_size)


def _input_shape(args: tuple, kwargs: dict) -> tuple[int, int, torch.device]:
    reference = kwargs.get("input_ids")
    if reference is None and args and isinstance(args[0], Tensor):
        reference = args[0]
    if reference is None:
        reference = kwargs.get("inputs_embeds")
    if reference is None or reference.dim() < 2:
        raise ValueError("adapter_ids needs input_ids [batch, seq] or inputs_embeds [batch, seq, hidden] "
                         "to lay out one id per sequence")
    return reference.shape[0], reference.shape[1], reference.device


def _make_pre_hook(state: _BankServing):
    def pre_hook(module, args, kwargs):
        adapter_ids = kwargs.pop("adapter_ids", None)
        expandable = False
        if adapter_ids is not None:
            ids = state.resolve(adapter_ids)
        elif state.generate_ids is not None:
            ids, expandable = state.generate_ids, True
        else:
            state.batch = None
            return args, kwargs
        batch_size, seq_len, device = _input_shape(args, kwargs)
        state.batch = state.prepare(ids, batch_size, seq_len, device, expandable)
        return args, kwargs

    return pre_hook


def _make_post_hook(state: _BankServing):
    def post_hook(module, args, output):
        state.batch = None
        return output

    return post_hook


def _make_slot_hook(state: _BankServing, name: str, d_in: int, d_out: int):
    def slot_hook(module, args, output):
        batch = state.batch
        if batch is None or not batch.has_adapters:
            return output
        x = args[0]
        x_rows = x.reshape(-1, d_in)
        if x_rows.shape[0] != batch.num_tokens:
            raise ValueError(f"{name}: the forward call's LoraBatch has {batch.num_tokens} tokens, this layer got "
                             f"{x_rows.shape[0]}; call the model itself (not a submodule) with adapter_ids")
        slot = state.slot(name, x.dtype, x.device)
        if output.dtype == x.dtype:
            out_rows = output.reshape(-1, d_out)
            add_lora(out_rows, x_rows, slot, batch)
            return out_rows.reshape(output.shape)
        term = add_lora(torch.zeros(x_rows.shape[0], d_out, dtype=x.dtype, device=x.device), x_rows, slot, batch)
        return output + term.reshape(output.shape).to(output.dtype)

    return slot_hook


def _generate_with_adapter_ids(state: _BankServing):
    def generate(self, *args: Any, adapter_ids: Optional[AdapterIds] = None, **kwargs: Any):
        if adapter_ids is None:
            return state.previous_generate(*args, **kwargs)
        state.generate_ids = state.resolve(adapter_ids)
        try:
            return state.previous_generate(*args, **kwargs)
        finally:
            state.generate_ids = None

    return generate


def _check_module(bank, slot: str, module: nn.Module) -> tuple[int, int]:
    d_out, d_in = bank.slot_shape(slot)
    got = (getattr(module, "out_features", None), getattr(module, "in_features", None))
    if got != (d_out, d_in):
        raise ValueError(f"bank slot {slot!r} is [d_out, d_in] = [{d_out}, {d_in}] but the model's module there is "
                         f"{type(module).__name__} with [out_features, in_features] = [{got[0]}, {got[1]}]")
    return d_in, d_out


def attach_bank(model: nn.Module, bank) -> nn.Module:
    """Serve every adapter of ``bank`` from ``model``, in place; returns ``model``.

    Args:
        model: a transformers model (e.g. ``LlamaForCausalLM``) whose modules include every
            ``bank.slots`` path (``model.get_submodule(slot)``), dense or bitsandbytes 4-bit.
        bank: an ``lolakernels.AdapterBank`` (``adapter_names``, ``slots``, ``slot_shape``,
            ``slot_weights``).

    Afterwards ``model(input_ids, adapter_ids=ids)`` adds, in every slot, adapter ``ids[s]``'s
    delta ``lora_b[c] Σ lora_a[c]`` to each token of sequence s: ``ids`` is one int per sequence
    (index into ``bank.adapter_names``, -1 = base), an adapter name (``"__base__"`` = base), a list
    of those, or an int tensor ``[batch]``; one value applies to every sequence. Without
    ``adapter_ids`` the model is the base model. ``model.generate(..., adapter_ids=ids)`` does the
    same at every step (with beam search or several returned sequences, ids repeat per copy).
    Bad ids raise ``ValueError`` naming ``adapter_ids``. ``detach_bank`` undoes it all.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"attach_bank expects a torch.nn.Module, got {type(model).__name__}")
    for attribute in ("adapter_names", "slots", "slot_shape", "slot_weights"):
        if not hasattr(bank, attribute):
            raise TypeError(f"bank must be an AdapterBank (missing {attribute!r}), got {type(bank).__name__}")
    if _STATE_ATTRIBUTE in model.__dict__:
        raise ValueError("a bank is already attached to this model; call detach_bank(model) first")
    modules = {}
    for slot in bank.slots:
        try:
            modules[slot] = model.get_submodule(slot)
        except AttributeError:
            raise ValueError(f"bank slot {slot!r} is not a module of this model (bank made for "
                             f"{getattr(bank, 'base_model', None)!r})") from None
    state = _BankServing(bank, modules)
    for slot, module in modules.items():
        d_in, d_out = _check_module(bank, slot, module)
        state.handles.append(module.register_forward_hook(_make_slot_hook(state, slot, d_in, d_out)))
    state.handles.append(model.register_forward_pre_hook(_make_pre_hook(state), with_kwargs=True))
    state.handles.append(model.register_forward_hook(_make_post_hook(state), always_call=True))
    if hasattr(model, "generate"):
        state.previous_generate = model.generate
        state.had_own_generate = "generate" in model.__dict__
        model.__dict__["generate"] = types.MethodType(_generate_with_adapter_ids(state), model)
    model.__dict__[_STATE_ATTRIBUTE] = state
    return model


def detach_bank(model: nn.Module) -> nn.Module:
    """Removes what ``attach_bank`` installed (hooks, the generate wrapper); returns ``model``."""
    state = model.__dict__.pop(_STATE_ATTRIBUTE, None)
    if state is None:
        raise ValueError("no bank is attached to this model")
    for handle in state.handles:
        handle.remove()
    if state.previous_generate is not None:
        if state.had_own_generate:
            model.__dict__["generate"] = state.previous_generate
        else:
            model.__dict__.pop("generate", None)
    return model


__all__ = ["attach_bank", "detach_bank"]
