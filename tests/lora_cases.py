"""Random shared-basis / multi-LoRA problems, an fp64 formula written independently of the
library, and the per-dtype tolerance rule of docs/design.md §3."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from lolakernels.reference import shared_basis_lora_torch

# Floor of the allowed error, relative to the largest |term|, per dtype. Low-precision results
# must also stay within 2x the error of the plain-PyTorch path in the same dtype (docs/design.md §3).
RELATIVE_FLOOR = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@dataclass
class Problem:
    x: Tensor
    lora_a: Tensor
    lora_b: Tensor
    sigma: Optional[Tensor]
    ids: Tensor
    basis_of: Tensor
    scale: float
    adapter_scale: Optional[Tensor]
    ranks: Optional[Tensor]

    @property
    def d_out(self) -> int:
        return self.lora_b.shape[1]

    def args(self):
        return (self.x, self.lora_a, self.lora_b, self.sigma, self.ids, self.basis_of, self.scale,
                self.adapter_scale, self.ranks)


def make_problem(
    num_tokens: int,
    d_in: int,
    d_out: int,
    rank: int,
    num_adapters: int,
    num_clusters: int,
    sigma_kind: str = "full",
    dtype: torch.dtype = torch.float32,
    ids: str = "mixed",
    with_ranks: bool = False,
    with_adapter_scale: bool = False,
    scale: float = 0.75,
    seed: int = 0,
    device: str = "cpu",
) -> Problem:
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=generator) * std).to(dtype).to(device)

    x = randn(num_tokens, d_in)
    lora_a = randn(num_clusters, rank, d_in, std=d_in ** -0.5)
    lora_b = randn(num_clusters, d_out, rank, std=rank ** -0.5)
    sigma = {
        "none": None,
        "diag": randn(num_adapters, rank),
        "full": randn(num_adapters, rank, rank, std=rank ** -0.5),
    }[sigma_kind]
    if ids == "none":
        token_ids = torch.full((num_tokens,), -1, dtype=torch.int32)
    elif ids == "all":
        token_ids = torch.randint(0, num_adapters, (num_tokens,), generator=generator, dtype=torch.int32)
    else:
        token_ids = torch.randint(-1, num_adapters, (num_tokens,), generator=generator, dtype=torch.int32)
    basis_of = torch.randint(0, num_clusters, (num_adapters,), generator=generator, dtype=torch.int32)
    ranks = (torch.randint(0, rank + 1, (num_adapters,), generator=generator, dtype=torch.int32)
             if with_ranks else None)
    adapter_scale = (torch.rand(num_adapters, generator=generator) * 2 - 0.5) if with_adapter_scale else None
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return Problem(x, lora_a, lora_b, sigma, to(token_ids), to(basis_of), scale, to(adapter_scale), to(ranks))


def formula_fp64(p: Problem) -> Tensor:
    """The LoRA term [T, d_out] in float64, token by token, straight from the op's definition."""
    rank = p.lora_a.shape[1]
    term = torch.zeros(p.x.shape[0], p.d_out, dtype=torch.float64)
    for t in range(p.x.shape[0]):
        a = int(p.ids[t])
        if a < 0:
            continue
        c = int(p.basis_of[a])
        true_rank = int(p.ranks[a]) if p.ranks is not None else rank
        keep = torch.zeros(rank, dtype=torch.float64)
        keep[:true_rank] = 1
        h = (p.lora_a[c].double().cpu() @ p.x[t].double().cpu()) * keep
        if p.sigma is None:
            g = h
        elif p.sigma.dim() == 2:
            g = p.sigma[a].double().cpu() * h
        else:
            g = p.sigma[a].double().cpu() @ h
        s = p.scale * (float(p.adapter_scale[a]) if p.adapter_scale is not None else 1.0)
        term[t] = p.lora_b[c].double().cpu() @ (s * g * keep)
    return term


def plain_torch_error(p: Problem, oracle: Tensor) -> float:
    """Max error of the plain-PyTorch composition in p's dtype (the docs/design.md §3 yardstick)."""
    if p.ranks is not None:  # the composition has no rank masking; only fp32 cases use ranks
        return 0.0
    term = shared_basis_lora_torch(p.x, p.lora_a, p.lora_b, p.sigma, p.ids, p.basis_of, p.scale, p.adapter_scale)
    return float((term.double().cpu() - oracle).abs().max()) if oracle.numel() else 0.0


def assert_term_close(result: Tensor, oracle: Tensor, p: Problem, what: str = "term") -> None:
    """result (any dtype) vs the fp64 oracle, with the tolerance rule of docs/design.md §3."""
    assert result.shape == oracle.shape, f"{what}: shape {tuple(result.shape)} != {tuple(oracle.shape)}"
    if oracle.numel() == 0:
        return
    magnitude = max(float(oracle.abs().max()), 1e-6)
    error = float((result.double().cpu() - oracle).abs().max())
    allowed = RELATIVE_FLOOR[result.dtype] * magnitude
    if result.dtype != torch.float32:
        allowed = max(allowed, 2 * plain_torch_error(p, oracle))
    assert error <= allowed, f"{what}: max error {error:.3g} > allowed {allowed:.3g} (|term| max {magnitude:.3g})"
