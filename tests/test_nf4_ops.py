"""The nf4 ops are torch custom ops: opcheck (schema, fake tensor, autograd registration),
torch.compile(fullgraph=True) without graph breaks, and gradients against fp64 autograd of the
reference formula."""
import copy
import gc
import weakref

import pytest
import torch

import lolakernels
from conftest import CPU_BACKENDS
from lolakernels import _ops
from lolakernels.ops.nf4 import read_nf4
from lolakernels.reference import nf4 as reference
from nf4_cases import quantize

OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _case(n=24, k=64, m=5, seed=0, nested=True):
    generator = torch.Generator().manual_seed(seed)
    packed, state = quantize(torch.randn(n, k, generator=generator).to(torch.bfloat16), 32, nested)
    x = torch.randn(m, k, generator=generator)
    lora_a = torch.randn(4, k, generator=generator) / 8
    lora_b = torch.randn(n, 4, generator=generator) / 2
    bias = torch.randn(n, generator=generator)
    magnitude = torch.rand(n, generator=generator) * 8 + 1
    return read_nf4(packed, state), (packed, state), x, lora_a, lora_b, bias, magnitude


@pytest.mark.parametrize("backend,isa", CPU_BACKENDS[:2], ids=["reference", "cpu"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_opcheck_linear(use_backend, backend, isa, dora):
    use_backend(backend, isa)
    nf4, _, x, lora_a, lora_b, bias, magnitude = _case()
    norm = reference.dora_weight_norm(nf4, lora_a, lora_b, 0.5) if dora else None
    args = (x.requires_grad_(True), *_ops.nf4_weight_args(nf4), torch.float32, None, lora_a.requires_grad_(True),
            lora_b.requires_grad_(True), 0.5, bias, magnitude.requires_grad_(True) if dora else None, norm)
    torch.library.opcheck(torch.ops.lolakernels.nf4_lora_linear.default, args, test_utils=OPCHECK_TESTS)


@pytest.mark.parametrize("backend,isa", CPU_BACKENDS[:2], ids=["reference", "cpu"])
def test_opcheck_dequantize_and_weight_norm(use_backend, backend, isa):
    use_backend(backend, isa)
    nf4, _, _, lora_a, lora_b, _, _ = _case(nested=False)
    torch.library.opcheck(torch.ops.lolakernels.nf4_dequantize.default, (*_ops.nf4_weight_args(nf4), torch.float16),
                          test_utils=OPCHECK_TESTS[:3])
    torch.library.opcheck(torch.ops.lolakernels.nf4_dora_weight_norm.default,
                          (*_ops.nf4_weight_args(nf4), lora_a, lora_b, 0.5), test_utils=OPCHECK_TESTS[:3])


class QLoraDoraLayer(torch.nn.Module):
    def __init__(self, weight, state, lora_a, lora_b, bias, magnitude):
        super().__init__()
        self.weight, self.state = weight, state
        self.lora_a, self.lora_b = torch.nn.Parameter(lora_a), torch.nn.Parameter(lora_b)
        self.bias, self.magnitude = bias, torch.nn.Parameter(magnitude)

    def forward(self, x):
        return torch.relu(lolakernels.nf4_lora_linear(x, self.weight, self.state, self.lora_a, self.lora_b, 0.5,
                                                      bias=self.bias, magnitude=self.magnitude))


@pytest.mark.parametrize("backend,isa", CPU_BACKENDS[:2], ids=["reference", "cpu"])
def test_compiles_fullgraph_without_graph_break(use_backend, backend, isa):
    use_backend(backend, isa)
    torch._dynamo.reset()
    _, (packed, state), x, lora_a, lora_b, bias, magnitude = _case(seed=2)
    module = QLoraDoraLayer(packed, state, lora_a, lora_b, bias, magnitude)
    eager = module(x)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), eager)
    compiled(x).sum().backward()  # the backward op traces too
    explanation = torch._dynamo.explain(module)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def _fp64_formula(x, w, w_state, lora_a, lora_b, bias, magnitude, scale):
    """fp64 y = x Wᵀ + b + (s − 1)(x Wᵀ) + s·scale·(x Aᵀ)Bᵀ with the norm detached (PEFT's DoRA),
    the norm taken on W rounded to the state's dtype as PEFT's dequantize_4bit returns it."""
    norm = torch.linalg.norm(w_state + scale * lora_b.detach() @ lora_a.detach(), dim=1).detach()
    s = magnitude / norm
    # bitsandbytes' backward multiplies by W in the state's dtype (forward: W straight in fp32).
    base = x @ w_state.t() + (x @ (w - w_state).t()).detach()
    return base + bias + (s - 1) * base + s * scale * ((x @ lora_a.t()) @ lora_b.t())


@pytest.mark.parametrize("backend,isa", CPU_BACKENDS[:2], ids=["reference", "cpu"])
@pytest.mark.parametrize("nested", [False, True])
def test_gradients_match_fp64_autograd(use_backend, backend, isa, nested):
    use_backend(backend, isa)
    nf4, (packed, state), x, lora_a, lora_b, bias, magnitude = _case(n=40, k=96, m=7, seed=5, nested=nested)
    leaves = [t.clone().requires_grad_(True) for t in (x, lora_a, lora_b, bias, magnitude)]
    y = lolakernels.nf4_lora_linear(leaves[0], packed, state, leaves[1], leaves[2], 0.5, bias=leaves[3],
                                    magnitude=leaves[4])
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    (y * upstream).sum().backward()
    w64 = reference.nf4_dequantize(nf4, torch.float64)
    w_state64 = reference.nf4_dequantize(nf4, nf4.dtype).double()
    leaves64 = [t.detach().double().requires_grad_(True) for t in (x, lora_a, lora_b, bias, magnitude)]
    y64 = _fp64_formula(leaves64[0], w64, w_state64, *leaves64[1:3], leaves64[3], leaves64[4], 0.5)
    (y64 * upstream.double()).sum().backward()
    torch.testing.assert_close(y.detach().double(), y64.detach(), rtol=1e-4, atol=1e-4)
    for name, leaf, leaf64 in zip(("x", "lora_a", "lora_b", "bias", "magnitude"), leaves, leaves64):
        torch.testing.assert_close(leaf.grad.double(), leaf64.grad, rtol=1e-4, atol=1e-4, msg=f"grad of {name}")


def test_dropout_applies_to_the_adapter_input_only():
    _, (packed, state), x, lora_a, lora_b, _, _ = _case(seed=7)
    torch.manual_seed(0)
    dropped = lolakernels.nf4_lora_linear(x, packed, state, lora_a, lora_b, 0.5, dropout_p=0.5)
    torch.manual_seed(0)
    mask_source = torch.nn.functional.dropout(x, 0.5, training=True)
    base = lolakernels.nf4_lora_linear(x, packed, state, None, None, 0.0)
    expected = base + 0.5 * (mask_source @ lora_a.t()) @ lora_b.t()
    torch.testing.assert_close(dropped, expected, rtol=1e-5, atol=1e-5)


def test_empty_batch_forward_and_backward():
    _, (packed, state), _, lora_a, lora_b, bias, magnitude = _case()
    x = torch.empty(0, 64, requires_grad=True)
    a = lora_a.clone().requires_grad_(True)
    y = lolakernels.nf4_lora_linear(x, packed, state, a, lora_b, 0.5, bias=bias, magnitude=magnitude)
    assert y.shape == (0, 24)
    y.sum().backward()
    assert x.grad.shape == (0, 64) and torch.equal(a.grad, torch.zeros_like(a))


@pytest.mark.parametrize("backend,isa", CPU_BACKENDS, ids=[isa or backend for backend, isa in CPU_BACKENDS])
@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_negated_views_are_read_as_their_values(use_backend, backend, isa, tokens, dora):
    """Raw pointers carry no negative bit: lazily negated inputs are resolved, not read as storage."""
    use_backend(backend, isa)
    _, (packed, state), x, lora_a, lora_b, bias, magnitude = _case(m=tokens)
    tensors = dict(x=x, lora_a=lora_a, lora_b=lora_b, bias=bias, magnitude=magnitude if dora else None)

    def run(**args):
        return lolakernels.nf4_lora_linear(args["x"], packed, state, args["lora_a"], args["lora_b"], 0.5,
                                           bias=args["bias"], magnitude=args["magnitude"])

    with torch.no_grad():
        expected = run(**tensors)
        for name, tensor in tensors.items():
            if tensor is None:
                continue
            view = torch._neg_view(-tensor)
            assert view.is_neg() and torch.equal(view, tensor)
            torch.testing.assert_close(run(**{**tensors, name: view}), expected, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("backend,isa", CPU_BACKENDS, ids=[isa or backend for backend, isa in CPU_BACKENDS])
@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "double-quant"])
def test_negated_quant_state_is_read_as_its_values(use_backend, backend, isa, nested):
    """The packed weight and the QuantState's tensors go to the kernels as raw pointers too."""
    use_backend(backend, isa)
    _, (packed, state), *_ = _case(nested=nested)
    expected = lolakernels.nf4_dequantize(packed, state)
    fields = [(state, "absmax")] + ([(state.state2, "absmax"), (state.state2, "code"), (state, "offset")]
                                    if nested else [])
    for owner, field in fields:
        tensor = getattr(owner, field)
        view = torch._neg_view(-tensor)
        assert view.is_neg() and torch.equal(view, tensor)
        changed, changed_owner = copy.copy(state), copy.copy(owner)
        setattr(changed_owner, field, view)
        if owner is state:
            changed = changed_owner
        else:
            changed.state2 = changed_owner
        torch.testing.assert_close(lolakernels.nf4_dequantize(packed, changed), expected, rtol=0, atol=0,
                                   msg=field)
    view = torch._neg_view(-packed)
    assert view.is_neg() and torch.equal(view, packed)
    torch.testing.assert_close(lolakernels.nf4_dequantize(view, state), expected, rtol=0, atol=0, msg="weight")


def _reference_linear(x, packed, state, lora_a, lora_b, scale, magnitude=None, bias=None):
    nf4 = read_nf4(packed, state)
    norm = None if magnitude is None else reference.dora_weight_norm(nf4, lora_a, lora_b, scale)
    return reference.nf4_lora_linear(x, nf4, torch.float32, None, lora_a, lora_b, scale, bias, magnitude, norm)


@pytest.mark.parametrize("backend,isa", CPU_BACKENDS, ids=[isa or backend for backend, isa in CPU_BACKENDS])
@pytest.mark.parametrize("tokens", [1, 12], ids=["kernel-shrink", "gemm-shrink"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["", "bias"])
def test_rank_zero_dora_still_applies_the_magnitude(use_backend, backend, isa, tokens, with_bias):
    """With no rank, DoRA's output is the base rescaled by magnitude / ‖W‖ (h is empty, not absent)."""
    use_backend(backend, isa)
    _, (packed, state), _, _, _, bias, magnitude = _case()
    x = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(3))
    lora_a, lora_b = torch.zeros(0, 64), torch.zeros(24, 0)
    bias = bias if with_bias else None
    got = lolakernels.nf4_lora_linear(x, packed, state, lora_a, lora_b, 0.5, bias=bias, magnitude=magnitude)
    expected = _reference_linear(x, packed, state, lora_a, lora_b, 0.5, magnitude, bias)
    plain = lolakernels.nf4_lora_linear(x, packed, state, None, None, 0.5, bias=bias)
    assert not torch.allclose(got, plain)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_magnitude_of_another_float_dtype_is_refused():
    _, (packed, state), x, lora_a, lora_b, _, magnitude = _case()
    with pytest.raises(TypeError, match="magnitude has dtype float64"):
        lolakernels.nf4_lora_linear(x, packed, state, lora_a, lora_b, 0.5, magnitude=magnitude.double())


def test_dora_norm_follows_every_piece_of_a_double_quantized_state():
    """The memoized DoRA norm is recomputed when the state's offset or second-level code changes."""
    _, (packed, state), x, lora_a, lora_b, _, magnitude = _case()
    lolakernels.nf4_lora_linear(x, packed, state, lora_a, lora_b, 0.5, magnitude=magnitude)
    for change in ("offset", "code", "absmax2"):
        if change == "offset":
            state.offset = state.offset + 0.25
        elif change == "code":
            state.state2.code = state.state2.code * 1.5
        else:
            state.state2.absmax = state.state2.absmax * 2
        got = lolakernels.nf4_lora_linear(x, packed, state, lora_a, lora_b, 0.5, magnitude=magnitude)
        torch.testing.assert_close(got, _reference_linear(x, packed, state, lora_a, lora_b, 0.5, magnitude),
                                   rtol=1e-5, atol=1e-5, msg=change)


def test_inference_mode_tensors():
    """Weights quantized and adapters made under torch.inference_mode have no version counter; they
    are read (without memoizing) inside and outside the mode."""
    expected_case = _case()
    with torch.inference_mode():
        _, (packed, state), x, lora_a, lora_b, bias, magnitude = _case()
        inside = lolakernels.nf4_lora_linear(x, packed, state, lora_a, lora_b, 0.5, bias=bias, magnitude=magnitude)
        dequantized = lolakernels.nf4_dequantize(packed, state)
    _, (packed0, state0), x0, lora_a0, lora_b0, bias0, magnitude0 = expected_case
    expected = lolakernels.nf4_lora_linear(x0, packed0, state0, lora_a0, lora_b0, 0.5, bias=bias0,
                                           magnitude=magnitude0)
    outside = lolakernels.nf4_lora_linear(x, packed, state, lora_a, lora_b, 0.5, bias=bias, magnitude=magnitude)
    for got in (inside, outside):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(dequantized, lolakernels.nf4_dequantize(packed0, state0), rtol=0, atol=0)


def test_incomplete_double_quantized_state_is_refused():
    _, (packed, state), *_ = _case()
    broken = copy.copy(state)
    broken.state2 = None
    with pytest.raises(ValueError, match="double-quantization pieces are missing"):
        lolakernels.nf4_dequantize(packed, broken)
    broken = copy.copy(state)
    broken.state2 = copy.copy(state.state2)
    broken.state2.blocksize = 0
    with pytest.raises(ValueError, match="state2.blocksize is 0"):
        lolakernels.nf4_dequantize(packed, broken)


def test_dora_norm_memo_goes_with_its_adapter():
    from lolakernels.ops import nf4 as nf4_ops

    _, (packed, state), x, lora_a, lora_b, _, magnitude = _case()
    lora_a = lora_a.clone()
    lolakernels.nf4_lora_linear(x, packed, state, lora_a, lora_b, 0.5, magnitude=magnitude)
    assert id(lora_a) in nf4_ops._weight_norms
    owner = weakref.ref(lora_a)
    del lora_a
    gc.collect()
    assert owner() is None
    assert all(entry[0]() is not None for entry in nf4_ops._weight_norms.values())
