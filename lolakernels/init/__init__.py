"""Adapter initialisations computed with the library's decompositions."""
from .._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "lora_ga": ".lora_ga_init",
    "lora_ga_export": ".lora_ga_init",
    "weight_gradients": ".lora_ga_init",
})
__all__ = ["lora_ga", "lora_ga_export", "weight_gradients"]
