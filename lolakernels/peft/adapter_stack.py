"""A PEFT LoRA layer's adapters as the stacked tensors ``multi_lora`` reads, and the per-token
adapter ids of a PEFT mixed batch (``adapter_names=``).

For the adapters ``a = 0 .. N-1`` of one layer (PEFT's ``lora_A`` order, one dtype):

    lora_a [N, r_max, d_in]   lora_A[a].weight padded with zero rows to r_max
    lora_b [N, d_out, r_max]  lora_B[a].weight padded with zero columns
    scale  [N] float32        PEFT's scaling[a] (alpha / r, or alpha / sqrt(r) with rsLoRA)
    ranks  [N] int32          true r of each adapter (None when all equal r_max)

so that ``multi_lora(x, lora_a, lora_b, ids, scale=scale, ranks=ranks)`` adds
``scaling[a] · lora_B[a](lora_A[a](x[t]))`` to every token t with ``a = ids[t]``.
"""
from __future__ import annotations

import logging
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger("lolakernels.peft")

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" rows of a mixed batch
_CACHE_ATTRIBUTE = "_lola_adapter_stack"
_logged_reasons: set[str] = set()
_token_ids_cache: dict[tuple, Tensor] = {}
_TOKEN_IDS_CACHE_SIZE = 64


def log_fallback_once(reason: str) -> None:
    """One log line per distinct reason and process: a layer ran PEFT's own forward."""
    if reason not in _logged_reasons:
        _logged_reasons.add(reason)
        logger.info("lolakernels: %s; these calls run on PEFT's own code path", reason)


class AdapterStack(NamedTuple):
    names: tuple[str, ...]
    index: dict[str, int]
    lora_a: Tensor
    lora_b: Tensor
    scale: Tensor
    ranks: Optional[Tensor]


def _weight_state(layer, names: Sequence[str]) -> tuple:
    """What the stacked copy depends on: each weight's identity, storage and in-place version."""
    state = []
    for name in names:
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        state.append((name, id(a), a.data_ptr(), a._version, id(b), b.data_ptr(), b._version))
    return tuple(state)


def _stack_weights(layer, names: Sequence[str]) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Differentiable stack (zero padding to the largest rank)."""
    weights_a = [layer.lora_A[n].weight for n in names]
    weights_b = [layer.lora_B[n].weight for n in names]
    ranks = [w.shape[0] for w in weights_a]
    r_max = max(ranks)
    lora_a = torch.stack([F.pad(w, (0, 0, 0, r_max - w.shape[0])) for w in weights_a])
    lora_b = torch.stack([F.pad(w, (0, r_max - w.shape[1])) for w in weights_b])
    rank_tensor = None
    if min(ranks) != r_max:
        rank_tensor = torch.tensor(ranks, dtype=torch.int32, device=lora_a.device)
    return lora_a, lora_b, rank_tensor


def stacked_adapters(layer, dtype: torch.dtype, *, differentiable: bool) -> AdapterStack:
    """Every adapter of ``layer`` whose weights have ``dtype``, stacked (see module docstring).

    The inference copy is cached on the layer and rebuilt when an adapter is added or removed,
    a weight is replaced, or updated in place through autograd-visible ops (optimizer steps,
    ``load_state_dict``, ``copy_``); writes through ``weight.data`` are not tracked, so call
    ``lolakernels.peft.restore`` and ``accelerate`` again after those. With ``differentiable`` the
    stack is rebuilt from the parameters on every call, so gradients reach them.
    """
    names = tuple(n for n in layer.lora_A
                  if layer.lora_A[n].weight.dtype == dtype and layer.lora_B[n].weight.dtype == dtype)
    scale = torch.tensor([float(layer.scaling[n]) for n in names], dtype=torch.float32,
                         device=layer.lora_A[names[0]].weight.device)
    index = {name: i for i, name in enumerate(names)}
    if differentiable:
        lora_a, lora_b, ranks = _stack_weights(layer, names)
        return AdapterStack(names, index, lora_a, lora_b, scale, ranks)
    state = _weight_state(layer, names)
    cached = layer.__dict__.get(_CACHE_ATTRIBUTE)
    if cached is None or cached[0] != state:
        with torch.no_grad():
            lora_a, lora_b, ranks = _stack_weights(layer, names)
        cached = (state, lora_a.contiguous(), lora_b.contiguous(), ranks)
        layer.__dict__[_CACHE_ATTRIBUTE] = cached
    _, lora_a, lora_b, ranks = cached
    return AdapterStack(names, index, lora_a, lora_b, scale, ranks)


def token_adapter_ids(adapter_names: Sequence[str], stack: AdapterStack, tokens_per_row: int,
                      device: torch.device) -> Tensor:
    """``[rows · tokens_per_row]`` int32 stack index of each token (-1 for ``"__base__"`` rows and
    adapters this layer does not have, which PEFT leaves on the base output)."""
    key = (stack.names, tuple(adapter_names), tokens_per_row, device)
    ids = _token_ids_cache.get(key)
    if ids is None:
        row_ids = torch.tensor([stack.index.get(name, -1) for name in adapter_names], dtype=torch.int32)
        ids = row_ids.repeat_interleave(tokens_per_row).to(device)
        if len(_token_ids_cache) >= _TOKEN_IDS_CACHE_SIZE:
            _token_ids_cache.clear()
        _token_ids_cache[key] = ids
    return ids
