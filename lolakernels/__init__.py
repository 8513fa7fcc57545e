"""lolakernels: fast kernels for serving and running LoRA adapters.

    import lolakernels
    y = lolakernels.shared_basis_lora(x, lora_a, lora_b, sigma, ids, basis_of=basis_of, out=y)
    y = lolakernels.multi_lora(x, lora_a, lora_b, ids, scale=scaling, out=y)
    bank = lolakernels.compress_adapters(["adapters/a", "adapters/b"], rank=16)
    w = lolakernels.nf4_dequantize(weight, quant_state)
    left, right = lolakernels.awsvd(weight, act_scale, rank=256)
"""
from ._info import info
from ._lazy import lazy_exports
from .ops import multi_lora, shared_basis_lora

__version__ = "0.1.0"

__getattr__, __dir__ = lazy_exports(__name__, {
    "compress_adapters": ".compress.joint",
    "AdapterBank": ".compress.bank",
    "nf4_dequantize": ".ops.nf4",
    "nf4_lora_linear": ".ops.nf4",
    "awsvd": ".compress.weighted_svd",
}, submodules=("compress", "merge", "peft", "serving", "reference", "init"))

__all__ = ["info", "multi_lora", "shared_basis_lora", "compress_adapters", "AdapterBank",
           "nf4_dequantize", "nf4_lora_linear", "awsvd", "__version__"]
