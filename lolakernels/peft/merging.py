"""``fast_merge(model)``: PEFT's ``add_weighted_adapter`` with its SVD combinations computed by
:func:`lolakernels.merge.svd_merge` instead of a dense full SVD per adapted weight.

    handle = lolakernels.peft.fast_merge(peft_model)
    peft_model.add_weighted_adapter(["a", "b"], [0.7, 0.3], "merged", combination_type="ties_svd", density=0.5)
    handle.restore()            # or: with lolakernels.peft.fast_merge(peft_model): ...

Only this model instance is patched. PEFT still runs everything around the SVD (argument checks,
the new adapter's config and injection, the other combination types), so the merged adapter is an
ordinary PEFT adapter and the global RNG is consumed as PEFT consumes it: DARE merges draw the
same masks as unpatched PEFT after the same ``torch.manual_seed``. The per-weight step PEFT calls
(``LoraModel._svd_generalized_task_arithmetic_weighted_adapter``) is replaced on the instance for
the duration of each SVD-type call; layers other than ``lora.Linear`` / ``lora.Embedding`` (e.g.
convolutions) keep PEFT's own step.

Differences from PEFT, all within the tolerance the tests check:
- ``svd``: computed exactly from the factors in float32, so float16/bfloat16 adapters are not
  rounded to their dtype as PEFT's dense deltas are (the result is closer to the exact merge);
- pruning types: a randomized truncated SVD (see :mod:`lolakernels.merge.factored_svd`);
- ``svd_full_matrices`` and ``svd_driver`` choose how PEFT's dense SVD is computed; neither
  changes the result and neither applies here, so both are accepted and ignored;
- options PEFT would turn into a crash or NaNs (density missing or outside [0, 1], DARE with
  density 0, an unknown sign method, a clamp outside [0, 1]) raise ValueError before the new
  adapter is created.
"""
from __future__ import annotations

import inspect
import weakref
from typing import Optional

from ..merge.factored_svd import COMBINATION_TYPES, check_merge_options, svd_merge

_PER_WEIGHT_STEP = "_svd_generalized_task_arithmetic_weighted_adapter"
_STEP_PARAMETERS = ("combination_type", "adapters", "weights", "new_rank", "target", "target_lora_A",
                    "target_lora_B", "density", "majority_sign_method", "clamp")
_handles: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _lora_model(model):
    """The LoraModel behind a PeftModel (or the LoraModel itself)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraModel

    if isinstance(model, PeftModel):
        model = model.base_model
    if not isinstance(model, LoraModel):
        raise TypeError(f"model must be a peft PeftModel or LoraModel holding LoRA adapters, "
                        f"got {type(model).__name__}")
    step = getattr(type(model), _PER_WEIGHT_STEP, None)
    if step is None or not set(_STEP_PARAMETERS) <= set(inspect.signature(step).parameters):
        import peft

        raise RuntimeError(f"peft {peft.__version__}'s LoraModel has no {_PER_WEIGHT_STEP}{_STEP_PARAMETERS}, "
                           "the per-weight step fast_merge replaces (as in peft 0.21)")
    return model


class FastMerge:
    """The patch on one model: :meth:`restore` removes it; usable as a context manager."""

    def __init__(self, lora_model, *, svd_method: str, niter: Optional[int], oversample: Optional[int], seed: int):
        self._model = weakref.ref(lora_model)
        self.options = dict(svd_method=svd_method, niter=niter, oversample=oversample, seed=seed)
        # A method bound to the model would keep it alive through the handle; the class's
        # function is looked up at call time instead.
        self._previous = lora_model.__dict__.get("add_weighted_adapter")
        self.merged_weights = 0  # adapted weights merged by svd_merge (the rest went to PEFT)

    @property
    def active(self) -> bool:
        model = self._model()
        return model is not None and _handles.get(model) is self

    def add_weighted_adapter(self, adapters, weights, adapter_name, combination_type="svd", svd_rank=None,
                             svd_clamp=None, svd_full_matrices=True, svd_driver=None, density=None,
                             majority_sign_method="total"):
        """PEFT's ``add_weighted_adapter`` (same arguments) with the SVD step of the SVD
        combination types computed by ``svd_merge``."""
        model = self._model()
        fast = combination_type in COMBINATION_TYPES and len(adapters) > 1
        if fast:
            check_merge_options(combination_type, density, majority_sign_method, svd_clamp)
            model.__dict__[_PER_WEIGHT_STEP] = self._merge_weight
        original = self._previous or type(model).add_weighted_adapter.__get__(model)
        try:
            return original(adapters, weights, adapter_name, combination_type=combination_type,
                                  svd_rank=svd_rank, svd_clamp=svd_clamp, svd_full_matrices=svd_full_matrices,
                                  svd_driver=svd_driver, density=density, majority_sign_method=majority_sign_method)
        finally:
            if fast:
                model.__dict__.pop(_PER_WEIGHT_STEP, None)

    def _merge_weight(self, combination_type, adapters, weights, new_rank, target, target_lora_A, target_lora_B,
                      density, majority_sign_method, clamp=None, full_matrices=True, driver=None):
        from peft.tuners.lora import Embedding, Linear

        if not isinstance(target, (Linear, Embedding)):
            original = getattr(type(self._model()), _PER_WEIGHT_STEP)
            return original(self._model(), combination_type, adapters, weights, new_rank, target, target_lora_A,
                            target_lora_B, density, majority_sign_method, clamp, full_matrices=full_matrices,
                            driver=driver)
        embedding = isinstance(target, Embedding)
        lora_a, lora_b, kept_weights, scalings = [], [], [], []
        for name, weight in zip(adapters, weights):
            if embedding and name in target.lora_embedding_A:
                lora_a.append(target.lora_embedding_A[name])
                lora_b.append(target.lora_embedding_B[name])
            elif not embedding and name in target.lora_A:
                lora_a.append(target.lora_A[name].weight)
                lora_b.append(target.lora_B[name].weight)
            else:
                continue
            kept_weights.append(weight)
            scalings.append(target.scaling[name])
        if not lora_a:
            raise ValueError(f"none of the adapters {list(adapters)} is attached to this layer "
                             f"({type(target).__name__})")
        transpose = embedding or bool(getattr(target, "fan_in_fan_out", False))
        new_a, new_b = svd_merge([a.detach() for a in lora_a], [b.detach() for b in lora_b], kept_weights,
                                 combination_type, scalings=scalings, rank=new_rank, density=density,
                                 majority_sign_method=majority_sign_method, clamp=clamp, transpose_delta=transpose,
                                 **self.options)
        self.merged_weights += 1
        return new_a, new_b

    def restore(self) -> None:
        """Puts the model's own ``add_weighted_adapter`` back (a no-op when already restored)."""
        model = self._model()
        if model is None or _handles.get(model) is not self:
            return
        if self._previous is None:
            model.__dict__.pop("add_weighted_adapter", None)
        else:
            model.__dict__["add_weighted_adapter"] = self._previous
        del _handles[model]

    def __enter__(self) -> "FastMerge":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def fast_merge(model, *, svd_method: str = "auto", niter: Optional[int] = None, oversample: Optional[int] = None,
               seed: int = 0) -> FastMerge:
    """Patches ``model.add_weighted_adapter`` (this instance only) so that its ``svd``,
    ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd`` and ``magnitude_prune_svd`` combinations
    run through :func:`lolakernels.merge.svd_merge`.

    Per adapted weight ``[d_out, d_in]`` with n adapters of total rank K, PEFT's dense SVD costs
    O(d_out · d_in · min(d_out, d_in)); ``svd`` becomes O((d_out + d_in) · K²) from the factors
    and the pruning types a randomized SVD of the pruned dense sum, O(d_out · d_in · K).

    Args:
        model: a ``peft.PeftModel`` or ``peft.tuners.lora.LoraModel``.
        svd_method, niter, oversample, seed: passed to ``svd_merge`` for the pruning types.

    Returns:
        A :class:`FastMerge` handle; ``handle.restore()`` (or leaving a ``with`` block) undoes the
        patch. Patching an already patched model returns its existing handle.
    """
    lora_model = _lora_model(model)
    existing = _handles.get(lora_model)
    if existing is not None:
        return existing
    if svd_method not in ("auto", "randomized", "exact"):
        raise ValueError(f"svd_method = {svd_method!r}; expected 'auto', 'randomized' or 'exact'")
    handle = FastMerge(lora_model, svd_method=svd_method, niter=niter, oversample=oversample, seed=seed)
    lora_model.__dict__["add_weighted_adapter"] = handle.add_weighted_adapter
    _handles[lora_model] = handle
    return handle
