"""Adapter merging computed from factors (PEFT's ``add_weighted_adapter`` SVD combinations)."""
from .._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {"svd_merge": ".factored_svd"})
__all__ = ["svd_merge"]
