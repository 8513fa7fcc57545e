"""Reading PEFT LoRA adapters into per-slot factors with PEFT's scaling folded in, with validation.

An adapter is a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``,
named by the directory's base name) or a pair ``(LoraConfig or its dict, state dict)``. For each
slot (the module path in the base model, e.g. ``model.layers.0.self_attn.q_proj``) it gives

    M = s · lora_B @ lora_A,   lora_A [r, d_in], lora_B [d_out, r],
    s = alpha / r  (alpha / sqrt(r) with use_rslora),

with r and alpha taken per module from ``rank_pattern`` / ``alpha_pattern`` exactly as PEFT
resolves them. Tensors of directories are read lazily, one slot at a time (safetensors mmap), so
a large collection never sits in memory at once.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# base_model.model.<slot>.lora_A.weight, or .lora_A.<adapter name>.weight as in a model's state_dict().
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<slot>.+)\.lora_(?P<side>[AB])(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class SlotInfo:
    """Shape and scaling of one adapted module: ``M = scaling · B A``, B [d_out, r], A [r, d_in]."""

    d_out: int
    d_in: int
    rank: int
    scaling: float


@dataclass
class LoadedAdapter:
    """One adapter: its config, per-slot shapes and scalings, and a reader for its tensors."""

    name: str
    config: Any  # peft.LoraConfig
    slots: dict[str, SlotInfo]
    _read: Callable[[str], Tensor] = field(repr=False)
    _keys: dict[str, tuple[str, str]] = field(repr=False)

    @property
    def base_model(self) -> Optional[str]:
        return self.config.base_model_name_or_path

    def factors(self, slot: str, dtype: torch.dtype = torch.float32,
                device: Optional[torch.device] = None) -> tuple[Tensor, Tensor]:
        """``(scaling · lora_B [d_out, r], lora_A [r, d_in])`` of one slot."""
        lora_b, lora_a = self.raw_factors(slot)
        return lora_b.to(device=device, dtype=dtype) * self.slots[slot].scaling, lora_a.to(device=device, dtype=dtype)

    def raw_factors(self, slot: str) -> tuple[Tensor, Tensor]:
        """``(lora_B [d_out, r], lora_A [r, d_in])`` as stored (scaling not applied)."""
        key_a, key_b = self._keys[slot]
        return self._read(key_b), self._read(key_a)


def _lora_config(name: str, config: Any):
    """A peft.LoraConfig from a LoraConfig or its dict; ValueError for other PEFT types and
    for variants whose delta is not ``s·B A`` (DoRA, LoRA bias, aLoRA, Arrow)."""
    import peft

    if isinstance(config, Mapping):
        try:
            config = peft.LoraConfig.from_peft_type(**dict(config))
        except (TypeError, ValueError) as error:
            raise ValueError(f"adapter {name!r}: its config is not a valid LoraConfig: {error}") from None
    if not isinstance(config, peft.LoraConfig):
        raise TypeError(f"adapter {name!r}: config must be a peft.LoraConfig or its dict, got {type(config).__name__}")
    refused = [("use_dora", "DoRA (a magnitude vector rescales the weight)"),
               ("lora_bias", "a LoRA bias term"),
               ("alora_invocation_tokens", "aLoRA (the delta depends on the tokens)"),
               ("arrow_config", "Arrow routing")]
    for attribute, what in refused:
        if getattr(config, attribute, None):
            raise ValueError(f"adapter {name!r} uses {what}; only plain LoRA deltas s·B·A can be compressed")
    return config


def _slot_scaling(config, slot: str, rank: int) -> float:
    from peft.utils.other import get_pattern_key

    alpha_key = get_pattern_key(config.alpha_pattern.keys(), slot)
    alpha = config.alpha_pattern.get(alpha_key, config.lora_alpha)
    return alpha / math.sqrt(rank) if config.use_rslora else alpha / rank


def _configured_rank(config, slot: str) -> int:
    from peft.utils.other import get_pattern_key

    return config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), slot), config.r)


def _build(name: str, config, shapes: dict[str, tuple[int, ...]], read: Callable[[str], Tensor]) -> LoadedAdapter:
    pairs: dict[str, dict[str, str]] = {}
    for key in shapes:
        match = _KEY.match(key)
        if match is None:
            raise ValueError(f"adapter {name!r}: state dict key {key!r} is not a LoRA lora_A/lora_B weight "
                             "(embedding LoRA, modules_to_save, DoRA magnitudes and biases are not supported)")
        side = pairs.setdefault(match["slot"], {})
        if match["side"] in side:
            raise ValueError(f"adapter {name!r}: slot {match['slot']!r} has two lora_{match['side']} weights")
        side[match["side"]] = key
    if not pairs:
        raise ValueError(f"adapter {name!r} has no lora_A/lora_B weights")
    slots, keys = {}, {}
    for slot, side in pairs.items():
        if set(side) != {"A", "B"}:
            missing = "lora_B" if "A" in side else "lora_A"
            raise ValueError(f"adapter {name!r}: slot {slot!r} has no {missing} weight")
        shape_a, shape_b = shapes[side["A"]], shapes[side["B"]]
        if len(shape_a) != 2 or len(shape_b) != 2 or shape_a[0] != shape_b[1]:
            raise ValueError(f"adapter {name!r}: slot {slot!r} has lora_A {list(shape_a)} and lora_B {list(shape_b)}; "
                             "expected [r, d_in] and [d_out, r] (linear layers only)")
        rank = shape_a[0]
        configured = _configured_rank(config, slot)
        if rank != configured:
            raise ValueError(f"adapter {name!r}: slot {slot!r} has rank {rank} in its weights but its config "
                             f"(r / rank_pattern) gives {configured}")
        slots[slot] = SlotInfo(d_out=shape_b[0], d_in=shape_a[1], rank=rank, scaling=_slot_scaling(config, slot, rank))
        keys[slot] = (side["A"], side["B"])
    ordered = sorted(slots, key=natural_key)
    return LoadedAdapter(name, config, {s: slots[s] for s in ordered}, read, {s: keys[s] for s in ordered})


def natural_key(text: str) -> list:
    """Sort key putting ``layers.2`` before ``layers.10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def read_adapter(name: str, adapter: Any) -> LoadedAdapter:
    """One adapter from a PEFT directory or a ``(config, state_dict)`` pair (see module docstring)."""
    if isinstance(adapter, (str, os.PathLike)):
        return _read_directory(name, Path(adapter))
    if isinstance(adapter, (tuple, list)) and len(adapter) == 2:
        config, state_dict = adapter
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"adapter {name!r}: the state dict must be a mapping of str to Tensor, "
                            f"got {type(state_dict).__name__}")
        for key, value in state_dict.items():
            if not isinstance(value, Tensor):
                raise TypeError(f"adapter {name!r}: state dict entry {key!r} is a {type(value).__name__}, not a Tensor")
            if not value.dtype.is_floating_point:
                raise TypeError(f"adapter {name!r}: state dict entry {key!r} has dtype {value.dtype}; expected floats")
        config = _lora_config(name, config)
        shapes = {key: tuple(value.shape) for key, value in state_dict.items()}
        return _build(name, config, shapes, state_dict.__getitem__)
    raise TypeError(f"adapter {name!r} must be a PEFT adapter directory or a (LoraConfig or dict, state dict) "
                    f"pair, got {type(adapter).__name__}")


def _read_directory(name: str, directory: Path) -> LoadedAdapter:
    import peft
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    if not directory.is_dir():
        raise ValueError(f"adapter {name!r}: {str(directory)!r} is not a directory")
    for file_name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / file_name).is_file():
            raise ValueError(f"adapter {name!r}: {directory} has no {file_name}")
    try:
        config = peft.LoraConfig.from_pretrained(str(directory))
    except (TypeError, ValueError, OSError) as error:
        raise ValueError(f"adapter {name!r}: {directory / CONFIG_FILE} is not a valid LoRA config: {error}") from None
    config = _lora_config(name, config)
    try:
        handle = safe_open(str(directory / WEIGHTS_FILE), framework="pt")
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"adapter {name!r}: {directory / WEIGHTS_FILE} is not a readable safetensors file: "
                         f"{error}") from None
    return _build(name, config, shapes, handle.get_tensor)


@dataclass
class AdapterCollection:
    """Adapters that all adapt the same slots of the same base model with the same shapes."""

    adapters: list[LoadedAdapter]
    slots: dict[str, tuple[int, int]]  # slot -> (d_out, d_in), in natural order

    @property
    def names(self) -> list[str]:
        return [adapter.name for adapter in self.adapters]

    @property
    def base_model(self) -> Optional[str]:
        return self.adapters[0].base_model

    @property
    def target_modules(self) -> list[str]:
        return sorted({slot.rsplit(".", 1)[-1] for slot in self.slots})

    @property
    def task_type(self) -> Optional[str]:
        types = {adapter.config.task_type for adapter in self.adapters}
        return str(types.pop()) if len(types) == 1 and None not in types else None

    def max_rank(self, slot: str) -> int:
        return max(adapter.slots[slot].rank for adapter in self.adapters)


def check_compatible(reference: LoadedAdapter, other: LoadedAdapter, reference_what: str = "") -> None:
    """ValueError saying which adapter and which slot differ (base model, slot set, shapes)."""
    what = reference_what or f"adapter {reference.name!r}"
    if other.base_model != reference.base_model:
        raise ValueError(f"adapter {other.name!r} targets base model {other.base_model!r} but {what} "
                         f"targets {reference.base_model!r}")
    compare_slots(other.name, {s: (i.d_out, i.d_in) for s, i in other.slots.items()},
                  {s: (i.d_out, i.d_in) for s, i in reference.slots.items()}, what)


def compare_slots(name: str, slots: Mapping[str, tuple[int, int]], expected: Mapping[str, tuple[int, int]],
                  expected_what: str) -> None:
    missing = [slot for slot in expected if slot not in slots]
    if missing:
        raise ValueError(f"adapter {name!r} has no slot {missing[0]!r}, which {expected_what} adapts")
    extra = [slot for slot in slots if slot not in expected]
    if extra:
        raise ValueError(f"adapter {name!r} adapts slot {extra[0]!r}, which {expected_what} does not")
    for slot, shape in expected.items():
        if tuple(slots[slot]) != tuple(shape):
            raise ValueError(f"adapter {name!r} has slot {slot!r} of shape [d_out, d_in] = {list(slots[slot])} "
                             f"but {expected_what} has {list(shape)}")


def read_adapters(adapters: Any) -> AdapterCollection:
    """A validated collection from a list of directories or a dict name -> (config, state dict)."""
    if isinstance(adapters, Mapping):
        items = list(adapters.items())
        for name, _ in items:
            if not isinstance(name, str) or not name:
                raise TypeError(f"adapters: names must be non-empty str, got {name!r}")
    elif isinstance(adapters, Sequence) and not isinstance(adapters, (str, bytes)):
        items = []
        for entry in adapters:
            if not isinstance(entry, (str, os.PathLike)):
                raise TypeError("adapters: a list must hold PEFT adapter directories; pass a dict "
                                f"name -> (config, state dict) for in-memory adapters (got {type(entry).__name__})")
            items.append((Path(entry).resolve().name, entry))
    else:
        raise TypeError(f"adapters must be a list of PEFT adapter directories or a dict name -> (config, state dict), "
                        f"got {type(adapters).__name__}")
    if not items:
        raise ValueError("adapters is empty: give at least one adapter")
    names = [name for name, _ in items]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"adapters: the name {duplicates[0]!r} occurs more than once (a directory's base name "
                         "is its adapter's name)")
    loaded = [read_adapter(name, adapter) for name, adapter in items]
    for other in loaded[1:]:
        check_compatible(loaded[0], other)
    first = loaded[0]
    return AdapterCollection(loaded, {slot: (info.d_out, info.d_in) for slot, info in first.slots.items()})
