"""lolakernels: fast kernels for serving and running LoRA adapters.

    import lolakernels
    y = lolakernels.shared_basis_lora(x, lora_a, lora_b, sigma, ids, basis_of=basis_of, out=y)
    y = lolakernels.multi_lora(x, lora_a, lora_b, ids, scale=scaling, out=y)
"""
from ._info import info
from .ops import multi_lora, shared_basis_lora

__version__ = "0.1.0"
__all__ = ["info", "multi_lora", "shared_basis_lora", "__version__"]
