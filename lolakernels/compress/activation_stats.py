"""Per-input-channel activation statistics of Linear layers, gathered by forward hooks.

For a layer with inputs ``x_t [d_in]`` over calibration tokens ``t = 1..T`` the hooks keep only
running sums ``Σ_t x_tj²`` and ``T`` (no activations are stored), from which
``d_j = sqrt(Σ_t x_tj² / T)`` (the AWSVD / Wanda scale) and ``‖x_j‖₂ = sqrt(Σ_t x_tj²)``.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
from torch import Tensor, nn


@dataclass
class ChannelStats:
    """Running ``Σ x²`` per input channel (float64) and the token count of one Linear layer."""

    sum_squares: Tensor
    tokens: int = 0

    def add(self, inputs: Tensor) -> None:
        flat = inputs.detach().reshape(-1, inputs.shape[-1])
        self.sum_squares += flat.double().square().sum(0)
        self.tokens += flat.shape[0]

    def rms(self) -> Tensor:
        """``d_j = sqrt(mean_t x_tj²)``, shape ``[d_in]``, float32."""
        if self.tokens == 0:
            raise RuntimeError("no calibration tokens reached this layer")
        return (self.sum_squares / self.tokens).sqrt().float()

    def norm(self) -> Tensor:
        """``‖x_j‖₂`` over the calibration tokens, shape ``[d_in]``, float32."""
        return self.sum_squares.sqrt().float()


@dataclass
class ActivationStats:
    """Statistics of several Linear layers, keyed by their qualified module names."""

    layers: dict[str, ChannelStats] = field(default_factory=dict)

    def __getitem__(self, name: str) -> ChannelStats:
        return self.layers[name]

    def __contains__(self, name: str) -> bool:
        return name in self.layers


@contextmanager
def recording(model: nn.Module, names: Iterable[str]) -> Iterator[ActivationStats]:
    """Registers input hooks on the named ``nn.Linear`` modules of ``model`` for the duration
    of the ``with`` block; every forward pass inside it adds to the yielded statistics."""
    stats = ActivationStats()
    handles = []
    modules = dict(model.named_modules())
    try:
        for name in names:
            module = modules.get(name)
            if not isinstance(module, nn.Linear):
                raise TypeError(f"{name!r} is not an nn.Linear of the model (got {type(module).__name__})")
            channel = ChannelStats(torch.zeros(module.in_features, dtype=torch.float64,
                                               device=module.weight.device))
            stats.layers[name] = channel
            handles.append(module.register_forward_pre_hook(lambda _module, args, _c=channel: _c.add(args[0])))
        yield stats
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def collect(model: nn.Module, input_ids: Tensor, names: Iterable[str], *, batch_size: int = 8,
            progress: bool = False) -> ActivationStats:
    """Runs ``model`` on ``input_ids [N, T]`` in batches and returns the input statistics of the
    named Linear layers."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    with recording(model, names) as stats:
        for start in tqdm(range(0, input_ids.shape[0], batch_size), desc="calibration", disable=not progress):
            model(input_ids[start:start + batch_size].to(device))
    return stats
