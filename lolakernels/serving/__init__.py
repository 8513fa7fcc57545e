"""Engine-facing API: per-step adapter metadata and graph-safe per-layer LoRA calls."""
from .._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "LoraBatch": ".batch",
    "add_lora": ".layers",
    "LoraSlot": ".layers",
    "LoraSlice": ".layers",
})
__all__ = ["LoraBatch", "LoraSlot", "LoraSlice", "add_lora"]
