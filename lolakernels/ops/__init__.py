"""Public ops, one file per op family."""
from .shared_basis_lora import multi_lora, shared_basis_lora

__all__ = ["multi_lora", "shared_basis_lora"]
