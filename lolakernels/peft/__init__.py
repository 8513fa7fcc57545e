"""Drop-in PEFT integration: faster layers behind PEFT's own modules, bank serving, fast merges."""
from .._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "accelerate": ".patch",
    "restore": ".patch",
    "attach_bank": ".bank_serving",
    "detach_bank": ".bank_serving",
    "fast_merge": ".merging",
})
__all__ = ["accelerate", "restore", "attach_bank", "detach_bank", "fast_merge"]
