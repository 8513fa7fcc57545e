"""Elementwise combinations of dense adapter deltas: TIES, DARE and magnitude pruning.

These are the task-vector merges PEFT's ``add_weighted_adapter`` applies before its SVD
(``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``). They act on
each element of the d_out × d_in deltas, so unlike the plain weighted sum they have no factored
form: the deltas are formed densely, one adapter at a time, and combined here.

Numbers follow PEFT 0.21.2 (``peft.utils.merge_utils``) so that the pruning decisions, which
are discontinuous in the inputs, come out the same:

- each delta is formed as PEFT's ``get_delta_weight`` forms it (in the adapter's dtype; on the
  CPU a float16/bfloat16 product is computed in float32 and rounded once);
- magnitude pruning keeps the ``int(density · numel)`` largest magnitudes;
- DARE draws one Bernoulli(density) mask per adapter, in adapter order, from the global RNG (or
  the generator given), with the delta's own shape, dtype and strides, and rescales by 1/density;
- the weights are float32 (float64 for float64 deltas) and multiply the pruned deltas after the
  sign election.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

# Combination names as PEFT spells them without the "_svd" suffix.
TIES = "ties"
DARE_LINEAR = "dare_linear"
DARE_TIES = "dare_ties"
MAGNITUDE_PRUNE = "magnitude_prune"
SIGN_METHODS = ("total", "frequency")


def adapter_delta(lora_a: Tensor, lora_b: Tensor, scaling: float, transpose: bool = False) -> Tensor:
    """``scaling · lora_b @ lora_a`` (``[d_out, d_in]``, or its transpose view when ``transpose``),
    in the adapter's dtype.

    On the CPU a float16/bfloat16 product is computed in float32 and rounded once, as PEFT's
    ``get_delta_weight`` does; the operations run in PEFT's order so that the result, including
    its memory layout, is the same tensor PEFT prunes.
    """
    dtype = lora_b.dtype
    upcast = lora_b.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
    if upcast:
        lora_a, lora_b = lora_a.float(), lora_b.float()
    product = lora_b @ lora_a
    if transpose:
        product = product.T
    delta = product * scaling
    return delta.to(dtype) if upcast else delta


def magnitude_prune(delta: Tensor, density: float) -> Tensor:
    """``delta`` with all but its ``k = int(density · numel)`` largest-magnitude entries zeroed.

    A selection threshold (``kthvalue``) costs a fraction of a full ``topk`` over millions of
    entries; when several entries tie at the threshold and only some of them fit in ``k``, which
    ones are kept is ``topk``'s choice, so that case runs ``topk`` itself.
    """
    if density >= 1:
        return delta
    count = delta.numel()
    keep = int(density * count)
    if keep == 0:
        return torch.zeros_like(delta)
    magnitude = delta.abs().reshape(-1)
    threshold = torch.kthvalue(magnitude.float() if magnitude.dtype in (torch.float16, torch.bfloat16)
                               else magnitude, count - keep + 1).values.to(magnitude.dtype)
    kept = magnitude >= threshold
    # Ties at a zero threshold are zeros: keeping any of them gives the same tensor.
    if int(torch.count_nonzero(kept)) == keep or float(threshold) == 0.0:
        return delta * kept.reshape(delta.shape)
    mask = torch.zeros_like(delta).reshape(-1)
    mask[torch.topk(magnitude, k=keep, largest=True).indices] = 1
    return delta * mask.reshape(delta.shape)


def random_prune(delta: Tensor, density: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """DARE: ``delta ⊙ m / density`` with ``m ~ Bernoulli(density)`` elementwise (one draw per
    entry, from ``generator`` or the global RNG)."""
    if density >= 1:
        return delta
    mask = torch.bernoulli(torch.full_like(delta, density), generator=generator)
    return delta * mask / density


def majority_sign(pruned: Sequence[Tensor], method: str) -> Tensor:
    """Elected sign per entry (+1 or −1; ties and zeros vote +1): the sign of ``Σ_i t_i``
    (``"total"``) or of ``Σ_i sign(t_i)`` (``"frequency"``), over the pruned, unweighted deltas."""
    total = torch.zeros_like(pruned[0], dtype=torch.promote_types(pruned[0].dtype, torch.float32))
    for tensor in pruned:
        total += tensor if method == "total" else tensor.sign()
    return torch.where(total >= 0, 1.0, -1.0).to(total.dtype)


def combine_deltas(deltas: Callable[[int], Tensor], weights: Tensor, combination: str, *,
                   density: Optional[float] = None, majority_sign_method: str = "total",
                   generator: Optional[torch.Generator] = None) -> Tensor:
    """Merged task vector of ``n = len(weights)`` dense deltas, in float32 (float64 for float64).

    ``deltas(i)`` returns delta i (``[d_out, d_in]``); it is called once per adapter, in order, so
    the linear combinations hold one delta at a time and the TIES ones the n pruned deltas.

    With ``t_i`` the pruned delta i (magnitude pruning for TIES/magnitude_prune, DARE's random
    pruning for the dare_* types, none for linear) and ``w_i`` the weights:

    - linear, dare_linear, magnitude_prune: ``Σ_i w_i t_i``;
    - ties, dare_ties: with ``e`` the elected sign (:func:`majority_sign`) and
      ``m_i = [sign(t_i) = e]``: ``Σ_i w_i t_i m_i / max(Σ_i m_i, 1)``.
    """
    pruned = []
    merged = None
    electing = combination in (TIES, DARE_TIES)
    for i in range(weights.shape[0]):
        delta = deltas(i)
        if combination in (TIES, MAGNITUDE_PRUNE):
            delta = magnitude_prune(delta, density)
        elif combination in (DARE_LINEAR, DARE_TIES):
            delta = random_prune(delta, density, generator)
        if electing:
            pruned.append(delta)
            continue
        term = delta.to(weights.dtype) * weights[i]
        merged = term if merged is None else merged.add_(term)
    if not electing:
        return merged
    elected = majority_sign(pruned, majority_sign_method)
    votes = torch.zeros_like(elected)
    for i, delta in enumerate(pruned):
        # sign(t_i) = e  ⇔  t_i · e > 0 (pruned zeros never agree).
        agrees = (delta * elected) > 0
        term = torch.where(agrees, delta.to(weights.dtype), 0.0) * weights[i]
        merged = term if merged is None else merged.add_(term)
        votes += agrees
        pruned[i] = None  # frees each pruned delta as soon as it is summed
    return merged / votes.clamp_(min=1.0)
