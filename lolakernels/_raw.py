"""How tensors cross into the raw-pointer extensions (lolakernels._C and lolakernels._cuda)."""
from __future__ import annotations

from typing import Optional

from torch import Tensor


def address(tensor: Optional[Tensor]) -> int:
    """Data pointer of an optional tensor; 0 (nullptr) when absent."""
    return 0 if tensor is None else tensor.data_ptr()


def sigma_kind(sigma: Optional[Tensor]) -> int:
    """SigmaKind of the C++/CUDA headers: 0 none, 1 diagonal [N, R], 2 full [N, R, R]."""
    return 0 if sigma is None else (1 if sigma.dim() == 2 else 2)
