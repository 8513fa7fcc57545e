"""Bad input raises ValueError/TypeError naming the argument; nothing is computed from it."""
import re

import pytest
import torch

import lolakernels
from lora_cases import make_problem


@pytest.fixture
def p():
    return make_problem(6, 16, 12, 4, 5, 2, sigma_kind="full", seed=1)


def call(p, **overrides):
    args = dict(x=p.x, lora_a=p.lora_a, lora_b=p.lora_b, sigma=p.sigma, ids=p.ids)
    kwargs = dict(basis_of=p.basis_of, scale=1.0)
    for key, value in overrides.items():
        (args if key in args else kwargs)[key] = value
    return lolakernels.shared_basis_lora(**args, **kwargs)


@pytest.mark.parametrize("bad_id", [5, 6, 1000, -2, -100])
def test_out_of_range_ids(p, bad_id):
    ids = p.ids.clone()
    ids[3] = bad_id
    out = torch.zeros(6, 12)
    with pytest.raises(ValueError, match=re.escape(f"ids[3] = {bad_id} is outside [-1, 5)")):
        call(p, ids=ids, out=out)
    assert torch.equal(out, torch.zeros(6, 12)), "out was written although the call was refused"


def test_out_of_range_ids_refused_by_the_cpu_kernel_even_without_validate(p, monkeypatch):
    """validate=False skips the Python range check; the CPU kernel still refuses, writing nothing."""
    monkeypatch.setenv("LOLA_BACKEND", "cpu")
    ids = p.ids.clone()
    ids[2] = 7
    out = torch.zeros(6, 12)
    with pytest.raises(ValueError, match=re.escape("ids[2] = 7 is outside [-1, 5)")):
        call(p, ids=ids, out=out, validate=False)
    assert torch.equal(out, torch.zeros(6, 12))


@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize("tokens", [6, 0])
def test_cpu_kernel_refuses_a_bad_entry_of_an_unused_adapter(p, monkeypatch, validate, tokens):
    """On the CPU path the kernel's own checks replace the Python ones: every entry of basis_of
    and ranks is checked, not only those of adapters the batch uses, and with T = 0 too."""
    monkeypatch.setattr(lolakernels._ops, "check_shared_basis_values",
                        lambda *args: pytest.fail("the CPU path ran the Python value checks"))
    basis_of = p.basis_of.clone()
    basis_of[4] = 2
    ids = torch.zeros(tokens, dtype=torch.int32)  # adapter 4 unused
    out = torch.zeros(tokens, 12)
    with pytest.raises(ValueError, match=re.escape("basis_of[4] = 2 is outside [0, 2) (C = 2 bases)")):
        call(p, x=p.x[:tokens], ids=ids, basis_of=basis_of, out=out, validate=validate)
    assert torch.equal(out, torch.zeros(tokens, 12))


@pytest.mark.parametrize("validate", [True, False])
def test_cpu_kernel_refuses_a_bad_rank_of_an_unused_adapter(validate):
    p = make_problem(4, 8, 6, 3, 3, 3, sigma_kind="none")
    out = torch.zeros(4, 6)
    with pytest.raises(ValueError, match=re.escape("ranks[2] = 5 is outside [0, 3] (R = 3)")):
        lolakernels.multi_lora(p.x, p.lora_a, p.lora_b, torch.tensor([0, 1, 0, -1], dtype=torch.int32),
                               ranks=torch.tensor([1, 3, 5], dtype=torch.int32), out=out, validate=validate)
    assert torch.equal(out, torch.zeros(4, 6))


def test_basis_of_pointing_past_c(p):
    basis_of = p.basis_of.clone()
    basis_of[1] = 2
    with pytest.raises(ValueError, match=re.escape("basis_of[1] = 2 is outside [0, 2)")):
        call(p, basis_of=basis_of, ids=torch.ones(6, dtype=torch.int32))


def test_basis_of_missing_with_several_bases(p):
    with pytest.raises(ValueError, match="basis_of is required: lora_a holds C = 2 bases"):
        call(p, basis_of=None)


@pytest.mark.parametrize("argument,value,message", [
    ("x", lambda p: p.x[:, :15], "lora_a.shape[2] = 16 but x's d_in"),
    ("lora_b", lambda p: p.lora_b[:, :, :3].contiguous(), "lora_b.shape[2] = 3 but the rank R"),
    ("lora_b", lambda p: p.lora_b[:1], "lora_b.shape[0] = 1 but the number of bases C"),
    ("sigma", lambda p: p.sigma[:, :3, :3].contiguous(), "sigma.shape[1] = 3 but the rank R"),
    ("sigma", lambda p: p.sigma[:4], "sigma.shape[0] = 4 but the number of adapters N"),
    ("sigma", lambda p: p.sigma[None], "sigma must be [N, R] (diagonal) or [N, R, R] (full)"),
    ("ids", lambda p: p.ids[:5], "ids.shape[0] = 5 but the number of tokens T"),
    ("x", lambda p: p.x[0], "x must be 2-D [T, d_in]"),
    ("lora_a", lambda p: p.lora_a[0], "lora_a must be 3-D [C, R, d_in]"),
])
def test_mismatched_shapes(p, argument, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call(p, **{argument: value(p)})


def test_mismatched_out(p):
    with pytest.raises(ValueError, match=re.escape("out.shape[0] = 5 but the number of tokens T")):
        call(p, out=torch.zeros(5, 12))
    with pytest.raises(ValueError, match="out has 13 columns but the LoRA term has d_out = 12"):
        call(p, out=torch.zeros(6, 13))
    with pytest.raises(ValueError, match=re.escape("out_slice = (5, 12) does not fit in out with 16 columns")):
        call(p, out=torch.zeros(6, 16), out_slice=(5, 12))
    with pytest.raises(ValueError, match="out_slice size 11 != d_out 12"):
        call(p, out=torch.zeros(6, 16), out_slice=(0, 11))
    with pytest.raises(ValueError, match="out_slice needs out"):
        call(p, out_slice=(0, 12))
    with pytest.raises(TypeError, match="out has dtype bfloat16; expected float32"):
        call(p, out=torch.zeros(6, 12, dtype=torch.bfloat16))


@pytest.mark.parametrize("argument", ["lora_a", "lora_b", "sigma"])
def test_dtype_mismatch_names_the_argument(p, argument):
    with pytest.raises(TypeError, match=f"{argument} has dtype bfloat16; expected float32"):
        call(p, **{argument: getattr(p, argument).bfloat16()})


def test_unsupported_dtypes(p):
    with pytest.raises(TypeError, match="x has dtype float64; expected float32, float16, bfloat16"):
        call(p, x=p.x.double(), lora_a=p.lora_a.double(), lora_b=p.lora_b.double(), sigma=p.sigma.double())
    with pytest.raises(TypeError, match="ids has dtype int16; expected int32"):
        call(p, ids=p.ids.short())
    with pytest.raises(TypeError, match="basis_of has dtype float32; expected int32"):
        call(p, basis_of=p.basis_of.float())


def test_forced_backend_that_cannot_take_the_dtype_says_which_it_can(p, monkeypatch):
    monkeypatch.setenv("LOLA_BACKEND", "cpu")
    half = make_problem(4, 8, 8, 2, 2, 1, dtype=torch.float16)
    with pytest.raises(RuntimeError, match=re.escape("LOLA_BACKEND=cpu cannot run this call: dtype float16 not "
                                                     "supported (cpu takes float32, bfloat16)")):
        lolakernels.shared_basis_lora(half.x, half.lora_a, half.lora_b, half.sigma, half.ids)


@pytest.mark.parametrize("forced,reason", [
    ("cuda", "cuda"),
    ("triton", "triton"),
    ("nonsense", "expected one of"),
])
def test_forced_backend_unavailable_raises_with_reason(p, monkeypatch, forced, reason):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: these backends are available")
    monkeypatch.setenv("LOLA_BACKEND", forced)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises((RuntimeError, ValueError), match=reason):
        call(p)


def test_non_contiguous_weights_refused_and_strided_rows_accepted(p):
    strided_a = torch.randn(2, 16, 4).transpose(1, 2)
    with pytest.raises(ValueError, match="lora_a must be contiguous"):
        call(p, lora_a=strided_a)
    with pytest.raises(ValueError, match="x must have unit stride in its last dimension"):
        call(p, x=torch.randn(16, 6).t())
    # Row-strided views (a slice of a fused activation) are taken as they are.
    wide = torch.randn(6, 40)
    view = wide[:, 8:24]
    assert torch.equal(call(p, x=view), call(p, x=view.contiguous()))


def negated_view(tensor):
    """A contiguous view showing tensor's values whose storage holds their negation. (The public
    route, z.conj().imag, has an inner stride of 2, which the contiguity checks refuse.)"""
    view = torch._neg_view(-tensor)
    assert view.is_neg() and view.is_contiguous() and torch.equal(view, tensor)
    return view


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("argument", ["x", "lora_a", "lora_b", "sigma", "ids", "basis_of"])
def test_negated_views_are_read_as_their_values(p, monkeypatch, backend, argument):
    """DLPack and raw pointers carry no negative bit: a lazily negated view is resolved first,
    never read as its storage."""
    monkeypatch.setenv("LOLA_BACKEND", backend)
    expected = call(p)
    assert torch.equal(call(p, **{argument: negated_view(getattr(p, argument))}), expected)
    out = torch.ones(6, 12)
    call(p, **{argument: negated_view(getattr(p, argument))}, out=out, validate=False)
    assert torch.equal(out, expected + 1)


def test_negated_views_of_multi_lora_scales_and_ranks():
    p = make_problem(4, 8, 6, 3, 3, 3, sigma_kind="none")
    ids = torch.tensor([0, 1, 2, -1], dtype=torch.int32)
    scale, ranks = torch.tensor([0.5, -2.0, 1.5]), torch.tensor([1, 3, 2], dtype=torch.int32)
    expected = lolakernels.multi_lora(p.x, p.lora_a, p.lora_b, ids, scale=scale, ranks=ranks)
    got = lolakernels.multi_lora(p.x, p.lora_a, p.lora_b, ids, scale=negated_view(scale), ranks=negated_view(ranks))
    assert torch.equal(got, expected)


def test_negated_out_is_refused(p):
    out = negated_view(torch.zeros(6, 12))
    with pytest.raises(ValueError, match="out is a lazily negated view"):
        call(p, out=out)
    assert torch.equal(out, torch.zeros(6, 12))


def test_devices_must_match(p):
    meta_a = p.lora_a.to("meta")
    with pytest.raises(ValueError, match="lora_a is on meta but x is on cpu"):
        call(p, lora_a=meta_a)


def test_scale_must_be_finite(p):
    with pytest.raises(ValueError, match="scale must be a finite float"):
        call(p, scale=float("nan"))


def test_multi_lora_refusals():
    p = make_problem(4, 8, 6, 3, 2, 2, sigma_kind="none")
    with pytest.raises(ValueError, match=re.escape("ranks[1] = 4 is outside [0, 3]")):
        lolakernels.multi_lora(p.x, p.lora_a, p.lora_b, p.ids, ranks=torch.tensor([1, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match=re.escape("scale must be a float or a [N] = [2] tensor, got shape [3]")):
        lolakernels.multi_lora(p.x, p.lora_a, p.lora_b, p.ids, scale=torch.ones(3))
    with pytest.raises(ValueError, match=re.escape("ids[0] = 2 is outside [-1, 2)")):
        lolakernels.multi_lora(p.x, p.lora_a, p.lora_b, torch.tensor([2, 0, 0, 0]))
    # the per-adapter scale is named as the caller passed it, not by the op's internal argument
    with pytest.raises(TypeError, match=r"^scale has dtype bfloat16; expected float32"):
        lolakernels.multi_lora(p.x, p.lora_a, p.lora_b, p.ids, scale=torch.ones(2, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"^scale is on meta but x is on cpu"):
        lolakernels.multi_lora(p.x, p.lora_a, p.lora_b, p.ids, scale=torch.ones(2, device="meta"))


@pytest.mark.parametrize("argument", ["ids", "basis_of"])
@pytest.mark.parametrize("validate", [True, False])
def test_int64_indices_int32_cannot_hold_are_refused_not_wrapped(p, argument, validate):
    """2**32 + 1 converted to int32 would read as 1: refused instead, naming the argument."""
    values = (p.ids if argument == "ids" else p.basis_of).long()
    values[1] = 2 ** 32 + values[1]
    message = f"{argument}[1] = {int(values[1])} is outside int32, so it is no valid index"
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        call(p, **{argument: values}, validate=validate)
    ranks = torch.full((2,), 2 ** 32 + 2)
    q = make_problem(4, 8, 6, 3, 2, 2, sigma_kind="none")
    message = "ranks[0] = 4294967298 is outside int32, so it is no valid index"
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        lolakernels.multi_lora(q.x, q.lora_a, q.lora_b, q.ids, ranks=ranks, validate=validate)


def test_index_sequences_of_floats_are_refused(p):
    with pytest.raises(TypeError, match="ids must hold integers, got float32"):
        call(p, ids=[0.0, 1.5, 2.0, 0.0, 1.0, -1.0])


@pytest.mark.parametrize("argument", ["x", "lora_a", "lora_b"])
def test_arguments_that_are_not_tensors(p, argument):
    with pytest.raises(TypeError, match=f"^{argument} must be a torch.Tensor, got list"):
        call(p, **{argument: getattr(p, argument).tolist()})


def test_out_checks_hold_when_autograd_takes_the_call(p):
    """With inputs that require grad the functional op runs and its term is added to out: out and
    out_slice get the same checks as without autograd."""
    x = p.x.clone().requires_grad_(True)
    with pytest.raises(ValueError, match=re.escape("out_slice = (-6, 12) does not fit")):
        call(p, x=x, out=torch.zeros(6, 24), out_slice=(-6, 12))
    with pytest.raises(ValueError, match="out.shape"):
        call(p, x=x[:1], ids=p.ids[:1], out=torch.zeros(3, 12))
    with pytest.raises(TypeError, match="out has dtype float64"):
        call(p, x=x, out=torch.zeros(6, 12, dtype=torch.float64))


def test_out_slice_must_be_ints(p):
    with pytest.raises(TypeError, match=re.escape("out_slice must be two ints (offset, size), got (2.9, 12)")):
        call(p, out=torch.zeros(6, 24), out_slice=(2.9, 12))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_out_sharing_memory_with_an_input_is_refused(p, monkeypatch, backend):
    """The kernels read lora_b (and the others) while they write out: an overlapping out is refused,
    as are rows of out that share memory."""
    monkeypatch.setenv("LOLA_BACKEND", backend)
    storage = torch.zeros(p.lora_b.numel() + 200)
    lora_b = storage[:p.lora_b.numel()].view_as(p.lora_b).copy_(p.lora_b)
    out = storage[8:8 + 72].view(6, 12)
    with pytest.raises(ValueError, match="^out shares memory with lora_b"):
        call(p, lora_b=lora_b, out=out)
    with pytest.raises(ValueError, match="^out shares memory with x"):
        q = make_problem(6, 12, 12, 4, 5, 2, sigma_kind="full", seed=1)
        lolakernels.shared_basis_lora(q.x, q.lora_a, q.lora_b, q.sigma, q.ids, basis_of=q.basis_of, out=q.x)
    with pytest.raises(ValueError, match="^out's rows overlap in memory"):
        call(p, out=torch.zeros(1, 12).expand(6, 12))


def test_a_column_of_any_inner_stride_is_taken(p):
    """[T, 1] views (a column of a wider tensor) have an arbitrary inner stride, which is never stepped."""
    q = make_problem(6, 1, 1, 4, 5, 2, sigma_kind="full", seed=2)
    x = torch.zeros(6, 3)[:, 1:2].copy_(q.x)
    out = torch.zeros(6, 3)[:, 2:3]
    expected = lolakernels.shared_basis_lora(q.x, q.lora_a, q.lora_b, q.sigma, q.ids, basis_of=q.basis_of)
    got = lolakernels.shared_basis_lora(x.as_strided((6, 1), (3, 7)), q.lora_a, q.lora_b, q.sigma, q.ids,
                                        basis_of=q.basis_of, out=out.as_strided((6, 1), (3, 5)))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["cpu-kernel", "reference"])
def test_bad_indices_refused_on_the_cpu_without_validate_on_every_backend(dtype):
    """fp16 on the CPU runs on the reference: it range-checks as the C++ kernel does."""
    q = make_problem(4, 8, 6, 3, 2, 2, sigma_kind="none")
    x, lora_a, lora_b = (t.to(dtype) for t in (q.x, q.lora_a, q.lora_b))
    with pytest.raises(ValueError, match=re.escape("basis_of[1] = -1 is outside [0, 2)")):
        lolakernels.shared_basis_lora(x, lora_a, lora_b, None, q.ids, basis_of=torch.tensor([0, -1], dtype=torch.int32),
                                      validate=False)
    with pytest.raises(ValueError, match="ranks"):
        lolakernels.multi_lora(x, lora_a, lora_b, q.ids, ranks=torch.tensor([2, -3], dtype=torch.int32),
                               validate=False)


def test_multi_lora_scale_that_requires_grad_is_refused():
    q = make_problem(4, 8, 6, 3, 2, 2, sigma_kind="none")
    with pytest.raises(ValueError, match=r"^scale does not take gradients"):
        lolakernels.multi_lora(q.x, q.lora_a, q.lora_b, q.ids, scale=torch.ones(2, requires_grad=True))
    with torch.no_grad():
        lolakernels.multi_lora(q.x, q.lora_a, q.lora_b, q.ids, scale=torch.ones(2, requires_grad=True))


def test_nan_in_lora_a_padding_is_ignored_on_every_cpu_backend(monkeypatch):
    q = make_problem(4, 8, 6, 3, 2, 2, sigma_kind="none")
    ranks = torch.tensor([2, 1], dtype=torch.int32)
    expected = lolakernels.multi_lora(q.x, q.lora_a, q.lora_b, q.ids, ranks=ranks)
    lora_a = q.lora_a.clone()
    lora_a[0, 2:] = float("nan")
    lora_a[1, 1:] = float("inf")
    for backend in ("cpu", "reference"):
        monkeypatch.setenv("LOLA_BACKEND", backend)
        got = lolakernels.multi_lora(q.x, lora_a, q.lora_b, q.ids, ranks=ranks)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6, msg=backend)
