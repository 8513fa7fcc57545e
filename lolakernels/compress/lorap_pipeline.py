"""LoRAP structured compression of Llama-family transformers models.

LoRAP (Li et al., 2024) compresses the two sub-layers of a decoder layer differently:

- attention projections have pronounced low-rank structure: each is replaced by its
  activation-weighted rank-r factors ``W ≈ L R`` (``lolakernels.awsvd``), two real Linear layers
  ``d_in → r → d_out``, with more of the layer's parameter budget given to ``W_v, W_o`` than to
  ``W_q, W_k`` (``para_allocate`` = kept parameters of (v, o) / kept parameters of (q, k));
- MLP intermediate channels are pruned structurally, lowest importance first, with
  ``s_j = Σ_i |W_gate[j,i]| ‖x_i‖ + Σ_i |W_up[j,i]| ‖x_i‖ + Σ_o |W_down[o,j]| ‖h_j‖``
  (weight × activation norm; ``x`` the MLP input, ``h`` the ``down_proj`` input).

Activation statistics come from one calibration pass with forward hooks that keep running sums
of ``x²`` per channel (``activation_stats``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.utils import skip_init

from . import activation_stats
from .weighted_svd import awsvd

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# Parameter groups of LoRAP's attention allocation: (q, k) and (v, o).
QUERY_KEY, VALUE_OUTPUT = ("q_proj", "k_proj"), ("v_proj", "o_proj")
MLP_MODES = ("prune", "decompose")
DECOMPOSITIONS = ("awsvd", "svd")

# Channels whose activations never left zero still get a small weight (relative to the largest
# channel), so their weights are approximated rather than given up for free and awsvd's
# positivity requirement holds.
_MIN_RELATIVE_SCALE = 1e-6


@dataclass
class ModuleReport:
    """One compressed Linear layer: what it became and its parameters before and after."""

    name: str
    kind: str  # "low-rank", "pruned" or "dense" (kept as is)
    shape: tuple[int, int]  # (d_out, d_in) before
    size: int  # rank for "low-rank", kept channels for "pruned", min(d_out, d_in) for "dense"
    params_before: int
    params_after: int


@dataclass
class LorapReport:
    """Per-module parameter counts and the achieved compression of the decoder layers."""

    ratio: float
    modules: list[ModuleReport] = field(default_factory=list)
    decoder_params_before: int = 0
    decoder_params_after: int = 0
    model_params_before: int = 0
    model_params_after: int = 0

    @property
    def achieved_ratio(self) -> float:
        """Fraction of the decoder layers' parameters removed."""
        return 1 - self.decoder_params_after / self.decoder_params_before

    @property
    def model_ratio(self) -> float:
        """Fraction of all of the model's parameters (embeddings included) removed."""
        return 1 - self.model_params_after / self.model_params_before

    def table(self) -> str:
        """Markdown: one row per (projection, kind, size) summed over the layers, then the ratios."""
        groups: dict[tuple, list[int]] = {}
        for row in self.modules:
            key = (row.name.rsplit(".", 1)[-1], row.kind, row.shape, row.size)
            entry = groups.setdefault(key, [0, 0, 0])
            entry[0] += 1
            entry[1] += row.params_before
            entry[2] += row.params_after
        lines = ["| projection | d_out×d_in | kind | rank / kept channels | layers | params before | params after |",
                 "|---|---|---|---|---|---|---|"]
        for (projection, kind, shape, size), (count, before, after) in groups.items():
            lines.append(f"| {projection} | {shape[0]}×{shape[1]} | {kind} | {size} | {count} "
                         f"| {before:,} | {after:,} |")
        lines.append("")
        lines.append(f"Decoder layers: {self.decoder_params_before:,} → {self.decoder_params_after:,} parameters, "
                     f"{100 * self.achieved_ratio:.1f}% removed (requested {100 * self.ratio:.1f}%); whole model "
                     f"{self.model_params_before:,} → {self.model_params_after:,} "
                     f"({100 * self.model_ratio:.1f}% removed).")
        return "\n".join(lines) + "\n"


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """``model.model.layers`` of a Llama-family causal LM, checked to have the projections."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise TypeError(f"model must be a transformers Llama-family causal LM with model.model.layers; "
                         f"got {type(model).__name__}")
    for index, layer in enumerate(layers):
        for owner, names in (("self_attn", ATTENTION_PROJECTIONS), ("mlp", MLP_PROJECTIONS)):
            for name in names:
                if not isinstance(getattr(getattr(layer, owner, None), name, None), nn.Linear):
                    raise TypeError(f"model layer {index} has no nn.Linear {owner}.{name}: LoRAP needs a "
                                     "Llama-family model with uncompressed projections")
    return layers


def projection_names(model: nn.Module) -> list[str]:
    """Qualified names of every attention and MLP projection of the decoder layers."""
    decoder_layers(model)
    return [f"model.layers.{index}.{owner}.{name}"
            for index in range(len(model.model.layers))
            for owner, names in (("self_attn", ATTENTION_PROJECTIONS), ("mlp", MLP_PROJECTIONS))
            for name in names]


def _break_even_rank(d_out: int, d_in: int) -> int:
    """Smallest rank at which the two factors hold at least as many parameters as W."""
    return math.ceil(d_out * d_in / (d_out + d_in))


def attention_ranks(shapes: dict[str, tuple[int, int]], ratio: float, para_allocate: float) -> dict[str, Optional[int]]:
    """LoRAP's rank allocation within one attention layer.

    The layer keeps ``(1 − ratio) · Σ d_out·d_in`` parameters, split between the (q, k) and
    (v, o) groups in the proportion ``1 : para_allocate``; inside a group every factorized
    matrix gets the same rank ``r = budget / Σ (d_out + d_in)``. A matrix whose rank reaches its
    break-even (factors as large as W) stays dense and the rest of its group shares what is
    left; a group that ends up entirely dense hands its unused budget to the other group.
    Returns ``name → rank`` (``None`` = kept dense).
    """
    groups = (QUERY_KEY, VALUE_OUTPUT)
    total = sum(d_out * d_in for d_out, d_in in shapes.values())
    budget = (1 - ratio) * total
    group_budget = [budget / (1 + para_allocate), budget * para_allocate / (1 + para_allocate)]
    dense: set[str] = set()
    while True:
        ranks: dict[str, Optional[int]] = {}
        changed = False
        for index, members in enumerate(groups):
            factored = [name for name in members if name not in dense]
            spent = sum(shapes[name][0] * shapes[name][1] for name in members if name in dense)
            if not factored:
                ranks.update({name: None for name in members})
                continue
            per_rank = sum(sum(shapes[name]) for name in factored)
            rank = max(1, int((group_budget[index] - spent) // per_rank))
            for name in factored:
                if rank >= _break_even_rank(*shapes[name]):
                    dense.add(name)
                    changed = True
                ranks[name] = rank
            ranks.update({name: None for name in members if name in dense})
        for index, members in enumerate(groups):
            other = 1 - index
            if all(name in dense for name in members) and any(name not in dense for name in groups[other]):
                surplus = group_budget[index] - sum(shapes[name][0] * shapes[name][1] for name in members)
                if surplus > 0:
                    group_budget[index] -= surplus
                    group_budget[other] += surplus
                    changed = True
        if not changed:
            return ranks


def _scale(stats: activation_stats.ChannelStats) -> Tensor:
    rms = stats.rms()
    return rms.clamp_min(_MIN_RELATIVE_SCALE * float(rms.max().clamp_min(torch.finfo(torch.float32).tiny)))


def factorized_linear(linear: nn.Linear, act_scale: Tensor, rank: int) -> nn.Sequential:
    """``nn.Sequential(Linear(d_in, r, bias=False), Linear(r, d_out))`` holding the AWSVD factors
    ``R [r, d_in]`` and ``L [d_out, r]`` of ``linear.weight`` (bias kept on the second layer)."""
    weight = linear.weight.detach()
    left, right = awsvd(weight.float(), act_scale.to(weight.device), rank)
    # skip_init: the weights are overwritten at once, a random init would only cost time.
    down = skip_init(nn.Linear, linear.in_features, rank, bias=False, device=weight.device, dtype=weight.dtype)
    up = skip_init(nn.Linear, rank, linear.out_features, bias=linear.bias is not None, device=weight.device,
                   dtype=weight.dtype)
    with torch.no_grad():
        down.weight.copy_(right)
        up.weight.copy_(left)
        if linear.bias is not None:
            up.bias.copy_(linear.bias)
    return nn.Sequential(down, up)


def _select_linear(linear: nn.Linear, keep: Tensor, dim: int) -> nn.Linear:
    """A new Linear with only the rows (dim 0, outputs) or columns (dim 1, inputs) in ``keep``."""
    weight = linear.weight.detach()
    kept = weight.index_select(dim, keep)
    out_features, in_features = kept.shape
    has_bias = linear.bias is not None
    pruned = skip_init(nn.Linear, in_features, out_features, bias=has_bias, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        pruned.weight.copy_(kept)
        if has_bias:
            pruned.bias.copy_(linear.bias.index_select(0, keep) if dim == 0 else linear.bias)
    return pruned


def mlp_channel_importance(mlp: nn.Module, input_norm: Tensor, hidden_norm: Tensor) -> Tensor:
    """``s_j`` of each intermediate channel (``[d_ff]``): ``|W_gate| ‖x‖ + |W_up| ‖x‖`` over the
    row j plus ``‖h_j‖ Σ_o |W_down[o, j]|`` (``input_norm [hidden]``, ``hidden_norm [d_ff]``)."""
    input_norm = input_norm.to(mlp.gate_proj.weight.device)
    hidden_norm = hidden_norm.to(mlp.gate_proj.weight.device)
    gate = mlp.gate_proj.weight.detach().float().abs() @ input_norm
    up = mlp.up_proj.weight.detach().float().abs() @ input_norm
    down = mlp.down_proj.weight.detach().float().abs().sum(0) * hidden_norm
    return gate + up + down


def _count(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def _require_ratio(ratio) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise ValueError(f"ratio must be the fraction of decoder-layer parameters to remove, in (0, 1); got {ratio!r}")
    return float(ratio)


def _check_calibration(calib_input_ids) -> None:
    if not isinstance(calib_input_ids, Tensor):
        raise TypeError(f"calib_input_ids must be a token-id tensor [N, T], got {type(calib_input_ids).__name__}")
    if calib_input_ids.dim() != 2 or calib_input_ids.numel() == 0:
        raise ValueError(f"calib_input_ids must be a non-empty [N, T] tensor, got shape {list(calib_input_ids.shape)}")
    if calib_input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"calib_input_ids has dtype {calib_input_ids.dtype}; expected int64 token ids")


@torch.no_grad()
def lorap(model: nn.Module, calib_input_ids: Optional[Tensor], ratio: float, *, para_allocate: float = 3.0,
          mlp: str = "prune", deco: str = "awsvd", progress: bool = True, batch_size: int = 8,
          statistics: Optional[activation_stats.ActivationStats] = None) -> tuple[nn.Module, LorapReport]:
    """Compresses a transformers Llama-family causal LM in place, removing ``ratio`` of the
    parameters of each decoder layer.

    Per decoder layer with ``P_attn`` attention and ``P_mlp`` MLP weight parameters:
    attention keeps ``(1 − ratio) P_attn`` parameters, factorized at the ranks of
    ``attention_ranks`` (each projection becomes ``Linear(d_in, r) → Linear(r, d_out)``);
    the MLP keeps ``round((1 − ratio) d_ff)`` intermediate channels (``mlp="prune"``, the
    highest ``mlp_channel_importance``), or each of gate/up/down is factorized at rank
    ``⌊(1 − ratio) d_out d_in / (d_out + d_in)⌋`` (``mlp="decompose"``).

    Args:
        model: e.g. ``LlamaForCausalLM``; modified in place (its config is not updated:
            layer shapes now differ per layer).
        calib_input_ids: ``[N, T]`` calibration token ids, run through the model once with hooks
            keeping only per-channel running sums of ``x²``. May be ``None`` when ``statistics``
            from an earlier ``activation_stats.collect(model, ids, projection_names(model))``
            of the same uncompressed model are passed.
        ratio: fraction of decoder-layer parameters to remove, in (0, 1).
        para_allocate: kept parameters of (W_v + W_o) / kept parameters of (W_q + W_k).
        mlp: ``"prune"`` (structured channel pruning) or ``"decompose"`` (AWSVD factors).
        deco: ``"awsvd"`` (activation-weighted) or ``"svd"`` (plain truncated SVD, the same
            solver with unit weights); the MLP pruning scores use activations either way.
        progress: show progress bars.
        batch_size: calibration sequences per forward pass.

    Returns:
        ``(model, LorapReport)``: parameters before/after per module and the achieved ratio.
    """
    ratio = _require_ratio(ratio)
    if isinstance(para_allocate, bool) or not isinstance(para_allocate, (int, float)) or not para_allocate > 0:
        raise ValueError(f"para_allocate must be a positive number, got {para_allocate!r}")
    if mlp not in MLP_MODES:
        raise ValueError(f"mlp must be one of {MLP_MODES}, got {mlp!r}")
    if deco not in DECOMPOSITIONS:
        raise ValueError(f"deco must be one of {DECOMPOSITIONS}, got {deco!r}")
    layers = decoder_layers(model)
    names = projection_names(model)
    if statistics is None:
        _check_calibration(calib_input_ids)
        statistics = activation_stats.collect(model, calib_input_ids, names, batch_size=batch_size,
                                              progress=progress)
    else:
        missing = [name for name in names if name not in statistics]
        if missing:
            raise ValueError(f"statistics lacks {len(missing)} projections, e.g. {missing[0]!r}")

    from tqdm.auto import tqdm

    report = LorapReport(ratio=ratio, decoder_params_before=_count(layers), model_params_before=_count(model))

    def record(name: str, kind: str, size: int, before: nn.Module, after: nn.Module) -> None:
        d_out, d_in = before.weight.shape
        report.modules.append(ModuleReport(name, kind, (d_out, d_in), size, _count(before), _count(after)))

    for index, layer in enumerate(tqdm(layers, desc="LoRAP", disable=not progress)):
        prefix = f"model.layers.{index}"
        attention = layer.self_attn
        shapes = {name: tuple(getattr(attention, name).weight.shape) for name in ATTENTION_PROJECTIONS}
        for name, rank in attention_ranks(shapes, ratio, para_allocate).items():
            linear = getattr(attention, name)
            if rank is None:
                record(f"{prefix}.self_attn.{name}", "dense", min(shapes[name]), linear, linear)
                continue
            scale = (_scale(statistics[f"{prefix}.self_attn.{name}"]) if deco == "awsvd"
                     else torch.ones(linear.in_features))
            replacement = factorized_linear(linear, scale, rank)
            record(f"{prefix}.self_attn.{name}", "low-rank", rank, linear, replacement)
            setattr(attention, name, replacement)

        block = layer.mlp
        if mlp == "prune":
            d_ff = block.gate_proj.out_features
            kept = max(1, round((1 - ratio) * d_ff))
            score = mlp_channel_importance(block, statistics[f"{prefix}.mlp.gate_proj"].norm(),
                                           statistics[f"{prefix}.mlp.down_proj"].norm())
            keep = torch.topk(score, kept).indices.sort().values
            for name, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
                linear = getattr(block, name)
                replacement = _select_linear(linear, keep, dim)
                record(f"{prefix}.mlp.{name}", "pruned", kept, linear, replacement)
                setattr(block, name, replacement)
        else:
            for name in MLP_PROJECTIONS:
                linear = getattr(block, name)
                d_out, d_in = linear.weight.shape
                rank = max(1, int((1 - ratio) * d_out * d_in // (d_out + d_in)))
                scale = (_scale(statistics[f"{prefix}.mlp.{name}"]) if deco == "awsvd"
                         else torch.ones(d_in))
                replacement = factorized_linear(linear, scale, rank)
                record(f"{prefix}.mlp.{name}", "low-rank", rank, linear, replacement)
                setattr(block, name, replacement)

    report.decoder_params_after = _count(layers)
    report.model_params_after = _count(model)
    return model, report
