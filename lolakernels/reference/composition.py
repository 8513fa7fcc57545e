"""The plain-PyTorch composition a user would write: two GEMMs and a gather of Σ, in the input
dtype. It is the benchmark baseline the kernels must beat and, in tests, the measure of how much
error a low-precision dtype brings by itself."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def shared_basis_lora_torch(
    x: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    sigma: Optional[Tensor],
    ids: Tensor,
    basis_of: Tensor,
    scale: float = 1.0,
    adapter_scale: Optional[Tensor] = None,
) -> Tensor:
    """LoRA term ``[T, d_out]`` in x's dtype: ``lora_b[c] · (scale · Σ_a · (lora_a[c] · x))``.

    One cluster: ``(x @ A.T)`` for all tokens, the gathered Σ's, ``@ B.T``. Several clusters: the
    same per cluster present in the batch (a host sync per call, as user code would have).
    """
    active = ids >= 0
    adapter = ids.clamp(min=0).long()
    coefficient = torch.full((x.shape[0], 1), scale, dtype=x.dtype, device=x.device)
    if adapter_scale is not None:
        coefficient = coefficient * adapter_scale[adapter].to(x.dtype).unsqueeze(-1)
    coefficient = coefficient * active.unsqueeze(-1).to(x.dtype)

    def core(h: Tensor, rows: Tensor) -> Tensor:
        if sigma is None:
            g = h
        elif sigma.dim() == 2:
            g = h * sigma[adapter[rows]]
        else:
            g = torch.bmm(sigma[adapter[rows]], h.unsqueeze(-1)).squeeze(-1)
        return g * coefficient[rows]

    if lora_a.shape[0] == 1:
        every = torch.arange(x.shape[0], device=x.device)
        return core(x @ lora_a[0].t(), every) @ lora_b[0].t()
    term = torch.zeros(x.shape[0], lora_b.shape[1], dtype=x.dtype, device=x.device)
    cluster = torch.where(active, basis_of[adapter].long(), -1)
    for c in torch.unique(cluster[active]).tolist():
        rows = (cluster == c).nonzero().squeeze(-1)
        term[rows] = core(x[rows] @ lora_a[c].t(), rows) @ lora_b[c].t()
    return term
