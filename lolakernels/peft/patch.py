"""``accelerate`` / ``restore``: swap PEFT's LoRA layers for lolakernels layers and back.

This is the one place that maps PEFT (and bitsandbytes) classes to lolakernels classes. Each
lolakernels layer is a subclass of the class it replaces and names it in ``replaces``; the swap
assigns ``module.__class__`` on the existing objects, so parameters, buffers, hooks, adapter
configs and state_dict keys stay exactly as PEFT built them.
"""
from __future__ import annotations

import importlib

from torch import nn

from .adapter_stack import logger

# (module, class) of each lolakernels layer; a module that cannot be imported here (optional
# dependency missing) contributes nothing.
_LOLA_LAYERS = (
    ("lolakernels.peft.layers", "LoraLinear"),               # replaces peft.tuners.lora.Linear
    ("lolakernels.peft.nf4_layers", "LoraLinear4bit"),       # replaces peft.tuners.lora.bnb.Linear4bit
    ("lolakernels.peft.nf4_layers", "Linear4bit"),           # replaces bitsandbytes.nn.Linear4bit
)


def lola_layer_classes() -> list[type]:
    """The lolakernels layer classes importable in this environment."""
    classes = []
    for module_name, class_name in _LOLA_LAYERS:
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            logger.debug("lolakernels: %s unavailable (%s)", module_name, error)
            continue
        cls = getattr(module, class_name, None)
        if cls is not None:
            classes.append(cls)
    return classes


def replacement_map() -> dict[type, type]:
    """PEFT/bitsandbytes class -> the lolakernels class that replaces it."""
    return {cls.replaces: cls for cls in lola_layer_classes()}


def _variants_summary(model: nn.Module) -> list[str]:
    found = set()
    for module in model.modules():
        for variant in getattr(module, "lora_variant", {}).values():
            found.add(type(variant).__name__)
    return sorted(found)


def accelerate(model: nn.Module) -> nn.Module:
    """Serve every PEFT LoRA layer of ``model`` with lolakernels kernels, in place.

    ``model``: a ``peft.PeftModel`` or a transformers/torch model with adapters injected by PEFT.
    Every module whose type is exactly ``peft.tuners.lora.Linear``, ``peft.tuners.lora.bnb.Linear4bit``
    or ``bitsandbytes.nn.Linear4bit`` becomes the lolakernels subclass of that type (when its
    module is available). For a layer with adapters ``a`` (``A_a [r_a, d_in]``, ``B_a [d_out, r_a]``)
    the output stays PEFT's ``y = W x + Σ_a scaling_a · B_a A_a x`` over the active adapters, or per
    row with ``adapter_names=``; see ``lolakernels.peft.layers``. Calling it twice is harmless.

    Returns ``model``. Raises ``TypeError`` when the model holds no layer it can replace.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"accelerate expects a torch.nn.Module (a PeftModel), got {type(model).__name__}")
    mapping = replacement_map()
    lola_classes = set(mapping.values())
    replaced = already = 0
    for module in model.modules():
        cls = mapping.get(type(module))
        if cls is not None:
            module.__class__ = cls
            replaced += 1
        elif type(module) in lola_classes:
            already += 1
    if replaced + already == 0:
        raise TypeError(
            "accelerate found no PEFT LoRA layer (peft.tuners.lora.Linear / lora.bnb.Linear4bit) in the model: "
            "pass a PeftModel or a model with adapters injected by PEFT")
    variants = _variants_summary(model)
    if variants:
        logger.info("lolakernels: adapters using %s keep running on PEFT's own code path", ", ".join(variants))
    return model


def restore(model: nn.Module) -> nn.Module:
    """Put PEFT's (and bitsandbytes') own layer classes back on every module ``accelerate``
    replaced, dropping the lolakernels caches (instance attributes named ``_lola_*``, which the
    layers create lazily). Returns ``model``."""
    for module in model.modules():
        original = getattr(type(module), "replaces", None)
        if original is not None and type(module).__module__.startswith("lolakernels.peft"):
            for attribute in [key for key in module.__dict__ if key.startswith("_lola_")]:
                del module.__dict__[attribute]
            module.__class__ = original
    return model


__all__ = ["accelerate", "restore", "replacement_map", "lola_layer_classes"]
