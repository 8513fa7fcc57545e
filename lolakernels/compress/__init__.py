"""Host-side compression: joint compression of adapter collections into an AdapterBank,
activation-weighted SVD and the LoRAP model-compression pipeline."""
from .._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "compress_adapters": ".joint",
    "AdapterBank": ".bank",
    "awsvd": ".weighted_svd",
    "lorap": ".lorap_pipeline",
})
__all__ = ["compress_adapters", "AdapterBank", "awsvd", "lorap"]
