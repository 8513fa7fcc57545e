"""LoRA-GA initialisation (Wang et al. 2024, "LoRA-GA: Low-Rank Adaptation with Gradient
Approximation") and the export of the trained adapter as a plain LoRA.

For each adapted weight ``W [d_out, d_in]`` with LoRA rank r, PEFT scaling s and the estimated
full fine-tuning gradient ``G = ∂L/∂W ≈ U S Vᵀ`` (top 2r singular triplets, from the randomized
SVD of :func:`lolakernels.compress.weighted_svd.randomized_svd`):

- direction ``ArB2r`` (the recipe's default): ``A₀ = ζ · V[:, :r]ᵀ``, ``B₀ = ζ · U[:, r:2r]``
  (``A2rBr``: A from r..2r, B from 0..r; ``ArBr``: A from the odd, B from the even indices);
- stable scale: ``ζ = d_out^{1/4} / √γ`` (``"unit"``: ζ = 1; ``"gd"``: ζ = 1/s);
- base weight offset: ``W ← W − s · B₀ A₀`` (with the factors as stored), so the adapted model's
  initial forward equals the base model's.

Why it works: one SGD step of size η on (A, B) changes the effective weight by
``−η s² (G AᵀA + B BᵀG) = −η s² ζ² (U_{:r} S_{:r} V_{:r}ᵀ + U_{r:2r} S_{r:2r} V_{r:2r}ᵀ)``, i.e. by
the best rank-2r approximation of the full fine-tuning step ``−η G``, scaled by ``s² ζ²``.

After training, the weights are ``W − s B₀A₀`` and ``(A, B)``: relative to the original W the
update is ``s (B A − B₀ A₀) = s [B | −B₀] [A ; A₀]``, an exact rank-2r LoRA on the original
base model. :func:`lora_ga_export` saves that (the recipe's choice: no approximation), or its
best rank-k approximation when a smaller adapter matters more than exactness.

This follows the authors' recipe (both factors scaled by ζ, B from unscaled singular vectors);
PEFT 0.21.2's built-in ``init_lora_weights="lora_ga"`` differs: it puts S into B and scales B only.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from ..compress.weighted_svd import randomized_svd
from ..compress.lowrank import product_sum_svd

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr")
SCALES = ("stable", "unit", "gd")
INITIAL_FACTORS = "lora_ga_initial_factors"


def _lora_layers(peft_model, adapter_name: str):
    """(module name in the base model, lora layer) for every layer holding ``adapter_name``."""
    from peft.tuners.lora import LoraLayer

    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.r:
            yield name, module


def _gradient_for(named_grads: Mapping, name: str) -> Optional[Tensor]:
    for key in (name, name + ".weight", name + ".base_layer.weight"):
        if key in named_grads:
            return named_grads[key]
    return None


def _split_directions(u: Tensor, vh: Tensor, r: int, direction: str) -> tuple[Tensor, Tensor]:
    """(A [r, d_in], B [d_out, r]) from the top-2r singular vectors, per the direction scheme."""
    if direction == "ArB2r":
        return vh[:r], u[:, r:2 * r]
    if direction == "A2rBr":
        return vh[r:2 * r], u[:, :r]
    return vh[1:2 * r:2], u[:, 0:2 * r:2]


def _check_options(direction: str, scale: str, stable_gamma, batch_size) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction = {direction!r}; expected one of {', '.join(DIRECTIONS)}")
    if scale not in SCALES:
        raise ValueError(f"scale = {scale!r}; expected one of {', '.join(SCALES)}")
    if isinstance(stable_gamma, bool) or not isinstance(stable_gamma, (int, float)) or not stable_gamma > 0:
        raise ValueError(f"stable_gamma = {stable_gamma!r}; expected a positive number (the stable scale's γ)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size = {batch_size!r}; expected a positive int (gradients per batched SVD)")


def _factorisation_jobs(peft_model, adapter_name: str, named_grads: Mapping) -> dict:
    """Checked gradients grouped by (gradient shape, r): {key: [(name, layer, gradient [d_out, d_in])]}."""
    from peft.tuners.lora import Linear as LoraLinear

    jobs = {}
    for name, layer in _lora_layers(peft_model, adapter_name):
        if not isinstance(layer, LoraLinear):
            raise ValueError(f"{name} is a {type(layer).__name__}: LoRA-GA initialises Linear layers only "
                             "(leave it out of target_modules)")
        gradient = _gradient_for(named_grads, name)
        if gradient is None:
            raise ValueError(f"named_grads has no gradient for {name!r} (nor {name + '.weight'!r}); "
                             f"it holds {len(named_grads)} entries")
        weight = layer.get_base_layer().weight
        if not isinstance(gradient, Tensor):
            raise TypeError(f"named_grads[{name!r}] must be a tensor, got {type(gradient).__name__}")
        if tuple(gradient.shape) != tuple(weight.shape):
            raise ValueError(f"named_grads[{name!r}] has shape {list(gradient.shape)} but the weight it estimates "
                             f"is {list(weight.shape)}")
        if layer.fan_in_fan_out:
            gradient = gradient.T
        r = layer.r[adapter_name]
        if 2 * r > min(gradient.shape):
            raise ValueError(f"{name}: LoRA-GA needs 2r = {2 * r} singular directions of a "
                             f"{list(gradient.shape)} gradient; lower r (rank_pattern) for this module")
        jobs.setdefault((tuple(gradient.shape), r), []).append((name, layer, gradient))
    return jobs


@torch.no_grad()
def lora_ga(model: torch.nn.Module, peft_config, named_grads: Mapping[str, Tensor], *,
            adapter_name: str = "default", direction: str = "ArB2r", scale: str = "stable",
            stable_gamma: float = 16, niter: Optional[int] = None, oversample: Optional[int] = None,
            seed: int = 0, batch_size: int = 8):
    """Wraps ``model`` in a PEFT LoRA model initialised by LoRA-GA (see the module docstring).

    Args:
        model: the base model (a ``torch.nn.Module``, not yet a PeftModel). Its target weights
            are offset in place by ``−s · B₀ A₀``.
        peft_config: a ``peft.LoraConfig`` (its ``init_lora_weights`` is replaced by this
            initialisation; ``r``, ``lora_alpha``, ``use_rslora``, ``rank_pattern``,
            ``alpha_pattern``, ``target_modules``, ``fan_in_fan_out`` are honoured).
        named_grads: estimated gradient ``[d_out, d_in]`` (the weight's own shape) of every
            targeted Linear weight, keyed by module name (``"model.layers.0.self_attn.q_proj"``)
            or parameter name (``"….q_proj.weight"``), e.g. from :func:`weight_gradients`.
        adapter_name: the PEFT adapter name.
        direction: ``"ArB2r"`` (default), ``"A2rBr"`` or ``"ArBr"``.
        scale: ``"stable"`` (default, ``ζ = d_out^{1/4}/√γ``), ``"unit"`` or ``"gd"``.
        stable_gamma: γ of the stable scale (the recipe's default 16).
        niter, oversample, seed: the randomized SVD's power iterations (default 4), extra sketch
            columns (default 2r: the recipe's 4r-column sketch) and seed.
        batch_size: gradients of one shape factorised per batched SVD call.

    Returns:
        The ``peft.PeftModel``. The initial factors, needed to export the trained adapter, are
        kept in ``peft_model.lora_ga_initial_factors[adapter_name][module_name] = (A₀, B₀)``.
    """
    import peft

    if isinstance(model, peft.PeftModel):
        raise TypeError("model must be the base model, not a PeftModel: lora_ga creates the LoRA adapter itself")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(peft_config, peft.LoraConfig):
        raise TypeError(f"peft_config must be a peft.LoraConfig, got {type(peft_config).__name__}")
    if not isinstance(named_grads, Mapping):
        raise TypeError(f"named_grads must be a mapping of module name -> gradient tensor, got "
                        f"{type(named_grads).__name__}")
    _check_options(direction, scale, stable_gamma, batch_size)

    config = copy.deepcopy(peft_config)
    config.init_lora_weights = True
    peft_model = peft.get_peft_model(model, config, adapter_name=adapter_name)

    try:
        jobs = _factorisation_jobs(peft_model, adapter_name, named_grads)
    except (ValueError, TypeError):
        peft_model.unload()  # puts the model's own layers back before reporting the bad input
        raise

    initial = {}
    for (_, r), group in jobs.items():
        for start in range(0, len(group), batch_size):
            chunk = group[start:start + batch_size]
            stacked = torch.stack([g.to(chunk[0][1].get_base_layer().weight.device, torch.float32)
                                   for _, _, g in chunk])
            u, _, vh = randomized_svd(stacked, 2 * r, oversample=2 * r if oversample is None else oversample,
                                      niter=4 if niter is None else niter, seed=seed)
            for i, (name, layer, _) in enumerate(chunk):
                initial[name] = _initialise_layer(layer, adapter_name, u[i], vh[i], direction, scale, stable_gamma)
    setattr(peft_model, INITIAL_FACTORS, {adapter_name: initial})
    return peft_model


def _initialise_layer(layer, adapter_name: str, u: Tensor, vh: Tensor, direction: str, scale: str,
                      stable_gamma: float) -> tuple[Tensor, Tensor]:
    r = layer.r[adapter_name]
    scaling = layer.scaling[adapter_name]
    lora_a, lora_b = _split_directions(u, vh, r, direction)
    if scale == "stable":
        zeta = u.shape[0] ** 0.25 / math.sqrt(stable_gamma)
    elif scale == "gd":
        zeta = 1.0 / scaling
    else:
        zeta = 1.0
    a_param, b_param = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
    a_param.data = (lora_a * zeta).to(a_param.dtype).contiguous()
    b_param.data = (lora_b * zeta).to(b_param.dtype).contiguous()
    # The offset uses the factors as stored, so that W − s·B₀A₀ + s·B₀A₀ cancels in the forward.
    offset = scaling * (b_param.data.float() @ a_param.data.float())
    weight = layer.get_base_layer().weight
    if layer.fan_in_fan_out:
        offset = offset.T
    weight.data = (weight.data.float() - offset.to(weight.device)).to(weight.dtype)
    return a_param.data.clone(), b_param.data.clone()


def weight_gradients(model: torch.nn.Module, peft_config, batches: Iterable[Mapping], *,
                     loss: Optional[Callable[[object], Tensor]] = None) -> dict[str, Tensor]:
    """Mean gradient ``∂L/∂W`` over ``batches`` of every Linear weight ``peft_config`` targets
    (the estimate LoRA-GA factorises), keyed by module name. Only those weights take gradients;
    the model's ``requires_grad`` flags and training mode are restored afterwards.

    Args:
        model: the base model.
        peft_config: the ``peft.LoraConfig`` whose ``target_modules`` select the weights.
        batches: keyword-argument dicts for ``model(**batch)``.
        loss: maps the model's output to a scalar loss (default ``output.loss``).
    """
    from peft.tuners.lora import LoraModel

    if peft_config.target_modules is None:
        raise ValueError("peft_config.target_modules is None: name the modules whose gradients LoRA-GA needs")
    targets = {name: module for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and LoraModel._check_target_module_exists(peft_config, name)}
    if not targets:
        raise ValueError(f"no Linear module of the model matches target_modules = {peft_config.target_modules!r}")
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    sums = {name: None for name in targets}
    count = 0
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for module in targets.values():
            module.weight.requires_grad_(True)
            module.weight.grad = None
        model.train()
        for batch in batches:
            output = model(**batch)
            value = output.loss if loss is None else loss(output)
            value.backward()
            for name, module in targets.items():
                grad = module.weight.grad.detach().float()
                sums[name] = grad.clone() if sums[name] is None else sums[name].add_(grad)
                module.weight.grad = None
            count += 1
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        model.train(was_training)
    if count == 0:
        raise ValueError("batches is empty: at least one batch is needed to estimate the gradients")
    return {name: total / count for name, total in sums.items()}


def _load_initial(initial: Union[str, Path, Mapping], adapter_name: str, peft_model) -> Mapping:
    """Initial factors as {module name: (A₀, B₀)} from the model, a mapping, or a directory that
    ``peft_model.save_pretrained`` wrote right after :func:`lora_ga`."""
    if initial is None:
        recorded = getattr(peft_model, INITIAL_FACTORS, {}).get(adapter_name)
        if recorded is None:
            raise ValueError(f"the model holds no LoRA-GA initial factors for adapter {adapter_name!r}: pass "
                             "initial= (the directory saved right after lora_ga, or the factors)")
        return recorded
    if isinstance(initial, Mapping):
        return initial
    from safetensors.torch import load_file

    path = Path(initial) / "adapter_model.safetensors"
    if not path.is_file():
        raise ValueError(f"initial = {str(initial)!r} holds no adapter_model.safetensors")
    state = load_file(str(path))
    factors = {}
    for key, value in state.items():
        if key.endswith(".lora_A.weight"):
            module = key[len("base_model.model."):-len(".lora_A.weight")]
            factors[module] = (value, state[key.replace(".lora_A.weight", ".lora_B.weight")])
    return factors


@torch.no_grad()
def lora_ga_export(peft_model, out_dir: Union[str, Path], *, adapter_name: str = "default",
                   rank: Optional[int] = None, initial: Union[None, str, Path, Mapping] = None) -> Path:
    """Saves what training changed, ``s (B A − B₀ A₀)`` per layer, as a plain PEFT LoRA adapter for
    the original (un-offset) base model; ``PeftModel.from_pretrained(base, out_dir)`` loads it.

    Args:
        peft_model: the model :func:`lora_ga` returned, after training.
        out_dir: folder to write ``adapter_config.json`` and ``adapter_model.safetensors`` into.
        adapter_name: the adapter to export.
        rank: None (default): the exact rank-2r adapter ``A' = [A; A₀]``, ``B' = [B, −B₀]`` with
            ``r`` and ``lora_alpha`` (and their patterns) set so the scaling s is unchanged — the
            exported model equals the trained one. An int k: the best rank-k approximation of each
            layer's update (``product_sum_svd`` of the factors), ``B' = U_k S_k^{1/2}``,
            ``A' = S_k^{1/2} Vh_k``, scaling 1 — a smaller adapter that is no longer exact.
        initial: the initial factors when the model does not hold them (a directory saved by
            ``save_pretrained`` right after :func:`lora_ga`, or ``{module: (A₀, B₀)}``).

    Returns:
        ``out_dir`` as a Path.
    """
    import peft
    from safetensors.torch import save_file

    if not isinstance(peft_model, peft.PeftModel):
        raise TypeError(f"peft_model must be the PeftModel lora_ga returned, got {type(peft_model).__name__}")
    if adapter_name not in peft_model.peft_config:
        raise ValueError(f"adapter_name = {adapter_name!r} is not one of {list(peft_model.peft_config)}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank = {rank!r}; expected None (exact rank-2r export) or a positive int")
    initial_factors = _load_initial(initial, adapter_name, peft_model)
    state = peft.get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    config = copy.deepcopy(peft_model.peft_config[adapter_name])
    for name, layer in _lora_layers(peft_model, adapter_name):
        if name not in initial_factors:
            raise ValueError(f"initial holds no factors for {name!r}")
        a0, b0 = (t.to(layer.lora_A[adapter_name].weight.device) for t in initial_factors[name])
        a1, b1 = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        if rank is None:
            new_a, new_b = torch.cat([a1, a0.to(a1.dtype)], 0), torch.cat([b1, -b0.to(b1.dtype)], 1)
        else:
            scaling = layer.scaling[adapter_name]
            # The update is a small difference of two products: float64 keeps the cancellation exact.
            u, s, vh = product_sum_svd([b1.double() * scaling, -b0.double() * scaling], [a1.double(), a0.double()],
                                       rank=rank)
            root = s.sqrt()
            new_a, new_b = (root[:, None] * vh).to(a1.dtype), (u * root).to(b1.dtype)
            missing = rank - new_a.shape[0]  # the update has rank ≤ 2r: zero components fill up to k
            if missing > 0:
                new_a = torch.cat([new_a, new_a.new_zeros(missing, new_a.shape[1])], 0)
                new_b = torch.cat([new_b, new_b.new_zeros(new_b.shape[0], missing)], 1)
        prefix = f"base_model.model.{name}"
        state[f"{prefix}.lora_A.weight"] = new_a.contiguous().cpu()
        state[f"{prefix}.lora_B.weight"] = new_b.contiguous().cpu()
    if rank is None:
        # Doubling r keeps s = alpha/r (or alpha/√r with rsLoRA) when alpha doubles (or grows by √2).
        grow = math.sqrt(2) if config.use_rslora else 2
        config.r = 2 * config.r
        config.lora_alpha = config.lora_alpha * grow
        config.rank_pattern = {key: 2 * value for key, value in config.rank_pattern.items()}
        config.alpha_pattern = {key: value * grow for key, value in config.alpha_pattern.items()}
    else:
        config.r, config.lora_alpha, config.use_rslora = rank, rank, False
        config.rank_pattern, config.alpha_pattern = {}, {}
    config.init_lora_weights = True
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    save_file({key: value.contiguous() for key, value in state.items()}, str(out / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    return out
