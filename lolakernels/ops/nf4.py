"""nf4 (QLoRA) ops on bitsandbytes' 4-bit weights, read as stored: dequantize, and the linear
layer with a LoRA or DoRA adapter fused into one pass over the packed weight.

Storage, rounding rules and the exact formulas: ``lolakernels.reference.nf4`` (docs/design.md §4).
"""
from __future__ import annotations

import math
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _ops
from ..reference.nf4 import BLOCKSIZES, STATE_DTYPES, Nf4Weight

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


# Memo tables keyed by id(owner): (weak reference to the owner, key, value). An entry holds while
# the key still matches (it names every tensor's storage and in-place version) and goes when its
# owner is freed. (A WeakKeyDictionary would compare tensors with ==.)
def _recall(table: dict, owner, key):
    entry = table.get(id(owner))
    if entry is not None and entry[0]() is owner and entry[1] == key:
        return entry[2]
    return None


def _remember(table: dict, owner, key, value) -> None:
    entry = table.get(id(owner))
    if entry is None or entry[0]() is not owner:
        weakref.finalize(owner, table.pop, id(owner), None)
    table[id(owner)] = (weakref.ref(owner), key, value)


def _tensor_key(tensor) -> tuple:
    return (id(tensor), tensor.data_ptr(), tensor._version, tensor.shape, tensor.stride(), tensor.dtype)


# Checked reads by QuantState: a serving loop reads the same weight every step, and the checks
# cost as much as a small layer's kernel. The key covers the state's fields and every tensor read.
# An entry holds views of the tensors it read until its state is freed or read with other tensors
# (bitsandbytes' Params4bit.to() keeps the QuantState: the next forward replaces the entry).
_reads: dict[int, tuple] = {}


def _read_key(weight: Tensor, quant_state) -> Optional[tuple]:
    """Everything read_nf4 reads from the pair; None where it is not a well-formed pair (no memo)."""
    try:
        nested = bool(getattr(quant_state, "nested", False))
        tensors = [weight, quant_state.absmax]
        fields = (tuple(quant_state.shape), quant_state.blocksize, quant_state.dtype, quant_state.quant_type, nested)
        if nested:
            state2 = quant_state.state2
            tensors += [state2.code, state2.absmax, quant_state.offset]
            fields += (state2.blocksize,)
        return fields + tuple(_tensor_key(t) for t in tensors)
    except (AttributeError, TypeError, RuntimeError):  # RuntimeError: an inference tensor has no version counter
        return None


def read_nf4(weight: Tensor, quant_state) -> Nf4Weight:
    """Checks a bitsandbytes (packed weight, QuantState) pair and returns its tensors.

    Raises ValueError/TypeError for anything that cannot be read exactly: fp4 states, the layout
    bitsandbytes repacks weights into for its AVX512-BF16 CPU kernel (``packing_format_for_cpu``),
    wrong sizes, dtypes, devices, or non-contiguous storage. A pair already checked, and unchanged
    since (same tensors, no in-place update), is not checked again."""
    if torch.compiler.is_compiling():
        return _read_nf4_checked(weight, quant_state)
    if getattr(quant_state, "packing_format_for_cpu", False):
        _refuse_repacked()
    key = _read_key(weight, quant_state)
    if key is not None:
        nf4 = _recall(_reads, quant_state, key)
        if nf4 is not None:
            return nf4
    nf4 = _read_nf4_checked(weight, quant_state)
    if key is not None:
        _remember(_reads, quant_state, key, nf4)
    return nf4


def _refuse_repacked():
    raise ValueError(
        "quant_state.packing_format_for_cpu is set: bitsandbytes repacked this weight in place for its "
        "AVX512-BF16 CPU kernel (on its first eval-mode forward) and rounded absmax to bfloat16, so the nf4 "
        "values can no longer be read exactly. Read the weight before any eval forward of bitsandbytes' "
        "Linear4bit (or run it in train mode / with inputs that require grad, which skip the repacking).")


def _read_nf4_checked(weight: Tensor, quant_state) -> Nf4Weight:
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be the packed torch.Tensor of a bitsandbytes Params4bit, got {type(weight).__name__}")
    for field in ("absmax", "shape", "blocksize", "quant_type", "dtype"):
        if not hasattr(quant_state, field):
            raise TypeError(f"quant_state must be a bitsandbytes QuantState (no attribute {field!r}), "
                            f"got {type(quant_state).__name__}")
    if getattr(quant_state, "packing_format_for_cpu", False):
        _refuse_repacked()
    if quant_state.quant_type != "nf4":
        raise ValueError(
            f"quant_state.quant_type is {quant_state.quant_type!r}; only 'nf4' is supported (Params4bit, "
            "Linear4bit and BitsAndBytesConfig default to 'fp4': pass quant_type='nf4' / bnb_4bit_quant_type='nf4')")
    blocksize = int(quant_state.blocksize)
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"quant_state.blocksize is {blocksize}; bitsandbytes blocksizes are {BLOCKSIZES}")
    if quant_state.dtype not in STATE_DTYPES:
        raise ValueError(f"quant_state.dtype is {quant_state.dtype}; expected float32, float16 or bfloat16")
    shape = tuple(int(s) for s in quant_state.shape)
    numel = math.prod(shape)
    if weight.dtype not in (torch.uint8, torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"weight has dtype {_dtype_name(weight.dtype)}; expected the packed storage of a Params4bit "
                        "(uint8, or the quant_storage dtype bfloat16 / float16 / float32)")
    if not weight.is_contiguous():
        raise ValueError(f"weight must be contiguous packed storage (got strides {tuple(weight.stride())})")
    # resolve_neg: the kernels read these through raw pointers, which carry no negative bit
    packed = weight.detach().resolve_neg().reshape(-1).view(torch.uint8)
    needed = (numel + 1) // 2
    if packed.numel() < needed or packed.numel() - needed >= max(weight.element_size(), 2):
        raise ValueError(f"weight holds {packed.numel()} bytes but quant_state.shape {list(shape)} needs {needed} "
                         "(two nf4 values per byte)")
    packed = packed[:needed]
    blocks = -(-numel // blocksize)
    device = packed.device
    absmax = absmax_q = absmax_code = absmax_scale = absmax_offset = None
    absmax_blocksize = 0
    if getattr(quant_state, "nested", False):
        state2 = getattr(quant_state, "state2", None)
        if not all(hasattr(state2, field) for field in ("code", "absmax", "blocksize")) or not hasattr(
                quant_state, "offset"):
            raise ValueError("quant_state.nested is set but its double-quantization pieces are missing: expected "
                             "quant_state.state2 (a QuantState with code, absmax, blocksize) and quant_state.offset")
        if int(state2.blocksize) <= 0:
            raise ValueError(f"quant_state.state2.blocksize is {state2.blocksize}; expected a positive block size")
        absmax_q = quant_state.absmax
        if absmax_q.dtype != torch.uint8:
            raise ValueError(f"quant_state.absmax has dtype {_dtype_name(absmax_q.dtype)}; a double-quantized state "
                             "stores uint8 codes")
        absmax_code, absmax_scale = state2.code, state2.absmax
        absmax_offset = quant_state.offset
        absmax_blocksize = int(state2.blocksize)
        for name, tensor, count in (("state2.code", absmax_code, 256),
                                    ("state2.absmax", absmax_scale, -(-blocks // max(absmax_blocksize, 1))),
                                    ("offset", absmax_offset, 1)):
            if not isinstance(tensor, Tensor) or tensor.dtype != torch.float32 or tensor.numel() != count:
                raise ValueError(f"quant_state.{name} must be a float32 tensor of {count} values")
        absmax_offset = absmax_offset.reshape(())
    else:
        absmax = quant_state.absmax
        if absmax.dtype != torch.float32:
            raise ValueError(f"quant_state.absmax has dtype {_dtype_name(absmax.dtype)}; expected float32")
    codes = absmax if absmax is not None else absmax_q
    if codes.numel() != blocks:
        raise ValueError(f"quant_state.absmax has {codes.numel()} values but {numel} elements in blocks of "
                         f"{blocksize} need {blocks}")
    tensors = dict(absmax=absmax, absmax_q=absmax_q, absmax_code=absmax_code, absmax_scale=absmax_scale,
                   absmax_offset=absmax_offset)
    for name, tensor in tensors.items():
        if tensor is not None and tensor.device != device:
            raise ValueError(f"quant_state's {name} is on {tensor.device} but the weight is on {device}")
    contiguous = {name: None if t is None else t.resolve_neg().reshape(-1).contiguous() if t.dim() else t.resolve_neg()
                  for name, t in tensors.items()}
    return Nf4Weight(packed, shape, blocksize, quant_state.dtype, absmax_blocksize=absmax_blocksize, **contiguous)


def _eager(*tensors: Optional[Tensor]) -> bool:
    """True when the call can skip the custom-op dispatcher: no autograd, not tracing."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


def nf4_dequantize(weight: Tensor, quant_state, *, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Dequantize a bitsandbytes nf4 weight, bit for bit as ``bitsandbytes.functional.dequantize_4bit``.

    ``W[j] = out_dtype(NF4_CODE[q_j] · absmax[j // blocksize])`` over the flattened weight (fp32
    product, one rounding), with ``absmax`` decoded from its 8-bit codes under double quantization.

    Args:
        weight: the packed tensor of a ``Params4bit`` (``(numel + 1) // 2`` bytes; any ``quant_storage``).
        quant_state: its ``QuantState`` (nf4; every blocksize; double quantization on or off).
        out_dtype: float32, float16 or bfloat16; default the state's dtype (what bitsandbytes returns).

    Returns:
        The weight with ``quant_state.shape`` in ``out_dtype``.
    """
    nf4 = read_nf4(weight, quant_state)
    out_dtype = nf4.dtype if out_dtype is None else out_dtype
    if out_dtype not in STATE_DTYPES:
        raise TypeError(f"out_dtype is {out_dtype}; expected float32, float16 or bfloat16")
    if _eager():
        return _ops.run_nf4_dequantize(nf4, out_dtype)
    return torch.ops.lolakernels.nf4_dequantize(*_ops.nf4_weight_args(nf4), out_dtype)


# DoRA weight norms by lora_a: recomputed only when the weight, the adapter or the scale changed.
_weight_norms: dict[int, tuple] = {}


def _norm_tensors(nf4: Nf4Weight, lora_a: Tensor, lora_b: Tensor) -> tuple:
    return (nf4.packed, nf4.absmax, nf4.absmax_q, nf4.absmax_code, nf4.absmax_scale, nf4.absmax_offset, lora_a,
            lora_b)


def _norm_key(nf4: Nf4Weight, lora_a: Tensor, lora_b: Tensor, scale: float) -> Optional[tuple]:
    """Every input of the norm; None where one cannot be keyed (an inference tensor has no
    version counter), and then the norm is not memoized."""
    try:
        return (float(scale), nf4.shape, nf4.dtype, nf4.blocksize, nf4.absmax_blocksize) + tuple(
            None if t is None else _tensor_key(t) for t in _norm_tensors(nf4, lora_a, lora_b))
    except RuntimeError:
        return None


def dora_weight_norm(nf4: Nf4Weight, lora_a: Tensor, lora_b: Tensor, scale: float) -> Tensor:
    """PEFT's DoRA ‖W + scale · lora_b · lora_a‖ per output row (detached), cached per adapter."""
    if torch.compiler.is_compiling():
        return torch.ops.lolakernels.nf4_dora_weight_norm(*_ops.nf4_weight_args(nf4), lora_a.detach(),
                                                          lora_b.detach(), float(scale))
    key = _norm_key(nf4, lora_a, lora_b, scale)
    if key is not None:
        kept = _recall(_weight_norms, lora_a, key)
        if kept is not None:
            return kept[0]
    with torch.no_grad():
        norm = _ops.run_nf4_dora_weight_norm(nf4, lora_a.detach(), lora_b.detach(), float(scale))
    if key is not None:
        # The entry keeps the tensors it names alive, so no other tensor can take their addresses
        # (and match the key) while it holds; all but lora_a, its owner, whose liveness the table
        # already checks (a reference to it would keep the entry from ever being freed).
        _remember(_weight_norms, lora_a, key, (norm, _norm_tensors(nf4, None, lora_b)))
    return norm


def _check_linear_args(x, nf4, lora_a, lora_b, scale, bias, magnitude, dropout_p, compute_dtype) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor [..., in_features], got {type(x).__name__}")
    if len(nf4.shape) != 2:
        raise ValueError(f"quant_state.shape is {list(nf4.shape)}; nf4_lora_linear needs a 2-D [out_features, in_features] weight")
    out_features, in_features = nf4.shape
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"x.shape[-1] = {x.shape[-1] if x.dim() else None} but the weight has in_features = "
                         f"{in_features} (quant_state.shape = {list(nf4.shape)})")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x has dtype {_dtype_name(x.dtype)}; expected float32, float16 or bfloat16")
    if compute_dtype not in FLOAT_DTYPES:
        raise TypeError(f"compute_dtype is {compute_dtype}; expected float32, float16 or bfloat16")
    if (lora_a is None) != (lora_b is None):
        raise ValueError("lora_a and lora_b go together: pass both or neither")
    if lora_a is not None:
        for name, tensor in (("lora_a", lora_a), ("lora_b", lora_b)):
            if not isinstance(tensor, Tensor) or tensor.dim() != 2:
                raise ValueError(f"{name} must be a 2-D tensor (PEFT's lora_A.weight [r, in_features] / "
                                 f"lora_B.weight [out_features, r]), got {getattr(tensor, 'shape', tensor)!r}")
        rank = lora_a.shape[0]
        if lora_a.shape[1] != in_features:
            raise ValueError(f"lora_a.shape[1] = {lora_a.shape[1]} but in_features is {in_features}")
        if tuple(lora_b.shape) != (out_features, rank):
            raise ValueError(f"lora_b has shape {list(lora_b.shape)}; expected [out_features, r] = [{out_features}, {rank}]")
        if lora_a.dtype not in FLOAT_DTYPES or lora_b.dtype != lora_a.dtype:
            raise TypeError(f"lora_a / lora_b have dtypes {_dtype_name(lora_a.dtype)} / {_dtype_name(lora_b.dtype)}; "
                            "expected one float dtype for both")
        if not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"scale must be a finite float, got {scale!r}")
    if bias is not None:
        if not isinstance(bias, Tensor) or tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias must be [out_features] = [{out_features}], got {getattr(bias, 'shape', bias)!r}")
        if bias.dtype not in FLOAT_DTYPES:
            raise TypeError(f"bias has dtype {_dtype_name(bias.dtype)}; expected a float dtype")
    if magnitude is not None:
        if lora_a is None:
            raise ValueError("magnitude (DoRA) needs lora_a and lora_b")
        if not isinstance(magnitude, Tensor) or tuple(magnitude.shape) != (out_features,):
            raise ValueError(f"magnitude must be [out_features] = [{out_features}], got "
                             f"{getattr(magnitude, 'shape', magnitude)!r}")
        if magnitude.dtype not in FLOAT_DTYPES:
            raise TypeError(f"magnitude has dtype {_dtype_name(magnitude.dtype)}; expected float32, float16 or bfloat16")
        if dropout_p > 0:
            raise ValueError("DoRA with dropout_p > 0 is not implemented (PEFT recomputes the base product on the "
                             "dropped-out input); use dropout_p=0")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    for name, tensor in (("x", x), ("lora_a", lora_a), ("lora_b", lora_b), ("bias", bias), ("magnitude", magnitude)):
        if tensor is not None and tensor.device != nf4.packed.device:
            raise ValueError(f"{name} is on {tensor.device} but the weight is on {nf4.packed.device}")


def nf4_lora_linear(
    x: Tensor,
    weight: Tensor,
    quant_state,
    lora_a: Optional[Tensor],
    lora_b: Optional[Tensor],
    scale: float,
    *,
    bias: Optional[Tensor] = None,
    magnitude: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    compute_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """QLoRA linear layer: ``y = x · deq(W)ᵀ + scale · (x · lora_aᵀ) · lora_bᵀ (+ bias)`` with the
    rounding of bitsandbytes' ``Linear4bit`` followed by PEFT's LoRA, or PEFT's DoRA with ``magnitude``:

        s = magnitude / ‖deq(W) + scale · lora_b · lora_a‖_row        (detached; cached per adapter)
        y = base + (s − 1) · (base − bias) + s · scale · (x · lora_aᵀ) · lora_bᵀ

    The full dequantized weight is never materialized: a GEMV over the packed bytes for a few
    tokens, tiles of dequantized rows otherwise; the backward re-dequantizes tiles.

    Args:
        x: ``[..., in_features]`` (float32, bfloat16, float16).
        weight, quant_state: a bitsandbytes nf4 ``Params4bit`` and its ``QuantState``, ``[out_features, in_features]``.
        lora_a: PEFT's ``lora_A.weight`` ``[r, in_features]``; ``None`` (with ``lora_b``) for the plain layer.
        lora_b: PEFT's ``lora_B.weight`` ``[out_features, r]``, same dtype as ``lora_a`` (PEFT's default fp32).
        scale: PEFT's ``scaling`` (lora_alpha / r).
        bias: ``[out_features]`` or None.
        magnitude: PEFT's ``lora_magnitude_vector`` weight ``[out_features]`` (DoRA), or None.
        dropout_p: dropout on the adapter's input (plain LoRA only), as PEFT's ``lora_dropout`` in training.
        compute_dtype: bitsandbytes' ``compute_dtype`` of the base product; default x's dtype.

    Returns:
        ``[..., out_features]`` in x's dtype. Gradients flow to x, lora_a, lora_b, bias and magnitude.
    """
    nf4 = read_nf4(weight, quant_state)
    compute_dtype = x.dtype if compute_dtype is None and isinstance(x, Tensor) else compute_dtype
    _check_linear_args(x, nf4, lora_a, lora_b, scale, bias, magnitude, dropout_p, compute_dtype)
    out_features, in_features = nf4.shape
    x2 = x.reshape(-1, in_features)
    x_lora = None
    if lora_a is not None and dropout_p > 0:
        x_lora = F.dropout(x2.to(lora_a.dtype), dropout_p, training=True)
    weight_norm = None
    if magnitude is not None:
        weight_norm = dora_weight_norm(nf4, lora_a, lora_b, scale)
    scale = float(scale) if lora_a is not None else 0.0
    if _eager(x, lora_a, lora_b, bias, magnitude):
        y = _ops.run_nf4_lora_linear(x2, nf4, compute_dtype, x_lora, lora_a, lora_b, scale, bias, magnitude,
                                     weight_norm)
    else:
        y = torch.ops.lolakernels.nf4_lora_linear(x2, *_ops.nf4_weight_args(nf4), compute_dtype, x_lora, lora_a,
                                                  lora_b, scale, bias, magnitude, weight_norm)
    return y.reshape(*x.shape[:-1], out_features)
