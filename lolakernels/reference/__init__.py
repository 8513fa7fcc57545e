"""Pure-PyTorch oracles (fp32 math): test oracle, CPU fallback and benchmark baseline."""
from .composition import shared_basis_lora_torch
from .shared_basis_lora import lora_term, shared_basis_lora_, shared_basis_lora_backward

__all__ = ["lora_term", "shared_basis_lora_", "shared_basis_lora_backward", "shared_basis_lora_torch"]
