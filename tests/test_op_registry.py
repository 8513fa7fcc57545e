"""Every op is a torch custom op: opcheck (schema, fake tensor, autograd registration),
torch.compile(fullgraph=True) with no graph break, and gradients that match an fp64 autograd."""
import pytest
import torch

import lolakernels
from conftest import CPU_BACKENDS
from lora_cases import make_problem

OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _op_args(p, validate=True):
    return (p.x, p.lora_a, p.lora_b, p.sigma, p.ids, p.basis_of, p.scale, p.adapter_scale, p.ranks, validate)


@pytest.mark.parametrize("backend,isa", CPU_BACKENDS[:2], ids=["reference", "cpu"])
@pytest.mark.parametrize("sigma_kind", ["none", "diag", "full"])
def test_opcheck_functional(use_backend, backend, isa, sigma_kind):
    use_backend(backend, isa)
    p = make_problem(9, 20, 14, 5, 4, 2, sigma_kind=sigma_kind, with_ranks=True, with_adapter_scale=True)
    p.x.requires_grad_(True)
    p.lora_a.requires_grad_(True)
    torch.library.opcheck(torch.ops.lolakernels.shared_basis_lora.default, _op_args(p), test_utils=OPCHECK_TESTS)


@pytest.mark.parametrize("backend,isa", CPU_BACKENDS[:2], ids=["reference", "cpu"])
def test_opcheck_inplace(use_backend, backend, isa):
    use_backend(backend, isa)
    p = make_problem(9, 20, 14, 5, 4, 2, sigma_kind="full")
    out = torch.randn(9, 30)
    torch.library.opcheck(torch.ops.lolakernels.shared_basis_lora_.default, (out, 7) + _op_args(p),
                          test_utils=OPCHECK_TESTS)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode, torch.enable_grad])
def test_inplace_op_through_the_dispatcher_bumps_out_version(mode):
    """A compiled model calls the in-place op through the dispatcher, whose ADInplaceOrView kernel
    (_ops._bump_version_of_first_argument) must still bump out's version: then autograd refuses
    a tensor it saved and the op changed, instead of computing a gradient from the changed
    values. The term is the one the op adds to a tensor autograd does not track."""
    p = make_problem(9, 20, 14, 5, 4, 2, sigma_kind="full", seed=3)
    leaf = torch.randn(9, 30, requires_grad=True)
    saved = leaf.exp()  # exp saves its result for backward
    before, version = saved.detach().clone(), saved._version
    with mode():
        torch.ops.lolakernels.shared_basis_lora_.default(saved, 7, *_op_args(p))
    assert saved._version > version
    expected = before.clone()
    torch.ops.lolakernels.shared_basis_lora_.default(expected, 7, *_op_args(p))
    assert not torch.equal(expected, before) and torch.equal(saved.detach(), expected)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.sum().backward()


class FusedQkvLora(torch.nn.Module):
    """What a serving layer does: base GEMM, then three LoRA slices added in place."""

    def __init__(self, p, d_out):
        super().__init__()
        self.p = p
        self.base = torch.nn.Linear(p.x.shape[1], 3 * d_out, bias=False)

    def forward(self, x, ids):
        p = self.p
        out = self.base(x)
        d_out = p.lora_b.shape[1]
        for part in range(3):
            lolakernels.shared_basis_lora(x, p.lora_a, p.lora_b, p.sigma, ids, basis_of=p.basis_of,
                                          out=out, out_slice=(part * d_out, d_out), validate=False)
        return out


@pytest.mark.parametrize("backend,isa", CPU_BACKENDS[:2], ids=["reference", "cpu"])
def test_compiles_fullgraph_without_graph_break(use_backend, backend, isa):
    use_backend(backend, isa)
    torch._dynamo.reset()
    p = make_problem(11, 24, 10, 4, 6, 2, sigma_kind="diag", seed=4)
    module = FusedQkvLora(p, 10)
    with torch.no_grad():
        eager = module(p.x, p.ids)
        compiled = torch.compile(module, fullgraph=True, backend="aot_eager")(p.x, p.ids)
    torch.testing.assert_close(compiled, eager)
    explanation = torch._dynamo.explain(module)(p.x, p.ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_compiles_with_inductor():
    torch._dynamo.reset()
    p = make_problem(5, 16, 8, 4, 3, 1, sigma_kind="full", seed=6)

    def step(x, ids):
        return torch.relu(lolakernels.shared_basis_lora(x, p.lora_a, p.lora_b, p.sigma, ids, validate=False))

    torch.testing.assert_close(torch.compile(step, fullgraph=True)(p.x, p.ids), step(p.x, p.ids))



@pytest.mark.parametrize("validate", [True, False])
def test_int64_indices_compile_fullgraph(validate):
    """int64 ids / basis_of (torch's default) are converted in the graph; their eager int32 range
    check, which reads data, is left out under tracing."""
    torch._dynamo.reset()
    p = make_problem(6, 16, 12, 4, 5, 2, sigma_kind="full", seed=1)

    def step(x, ids):
        out = torch.zeros(x.shape[0], 12)
        return lolakernels.shared_basis_lora(x, p.lora_a, p.lora_b, p.sigma, ids, basis_of=p.basis_of.long(), out=out,
                                             validate=validate)

    ids = p.ids.long()
    explanation = torch._dynamo.explain(step)(p.x, ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch.testing.assert_close(torch.compile(step, fullgraph=True, backend="aot_eager")(p.x, ids), step(p.x, ids))


def test_multi_lora_compiles_fullgraph_on_the_eager_cpu_path_inputs():
    """multi_lora with the inputs its eager CPU path takes straight to the kernel (implied basis,
    [N] scale, int32 ranks, out) still traces whole: the straight path is left out under tracing."""
    torch._dynamo.reset()
    p = make_problem(9, 20, 12, 4, 5, 5, sigma_kind="none", with_ranks=True, with_adapter_scale=True, seed=9)

    def step(x, ids):
        out = torch.zeros(x.shape[0], 12)
        lolakernels.multi_lora(x, p.lora_a, p.lora_b, ids, scale=p.adapter_scale, ranks=p.ranks, out=out)
        return out

    explanation = torch._dynamo.explain(step)(p.x, p.ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch.testing.assert_close(torch.compile(step, fullgraph=True, backend="aot_eager")(p.x, p.ids), step(p.x, p.ids))

def _fp64_term(x, lora_a, lora_b, sigma, p):
    """Differentiable fp64 formula (the same math as lora_cases.formula_fp64)."""
    rows = []
    rank = lora_a.shape[1]
    for t in range(x.shape[0]):
        a = int(p.ids[t])
        if a < 0:
            rows.append(torch.zeros(lora_b.shape[1], dtype=torch.float64))
            continue
        c = int(p.basis_of[a])
        keep = (torch.arange(rank) < (int(p.ranks[a]) if p.ranks is not None else rank)).double()
        h = (lora_a[c] @ x[t]) * keep
        g = h if sigma is None else (sigma[a] * h if sigma.dim() == 2 else sigma[a] @ h)
        s = p.scale * (float(p.adapter_scale[a]) if p.adapter_scale is not None else 1.0)
        rows.append(lora_b[c] @ (s * g * keep))
    return torch.stack(rows)


@pytest.mark.parametrize("backend,isa", CPU_BACKENDS[:2], ids=["reference", "cpu"])
@pytest.mark.parametrize("sigma_kind", ["none", "diag", "full"])
@pytest.mark.parametrize("with_ranks", [False, True])
def test_gradients_match_fp64_autograd(use_backend, backend, isa, sigma_kind, with_ranks):
    use_backend(backend, isa)
    p = make_problem(13, 18, 11, 5, 4, 2, sigma_kind=sigma_kind, with_ranks=with_ranks, with_adapter_scale=True)
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in (p.x, p.lora_a, p.lora_b, p.sigma)]
    result = torch.ops.lolakernels.shared_basis_lora(*leaves, p.ids, p.basis_of, p.scale, p.adapter_scale, p.ranks, True)
    weights = torch.randn(13, 11)
    (result * weights).sum().backward()
    leaves64 = [t.detach().double().requires_grad_(True) if t is not None else None for t in leaves]
    (_fp64_term(*leaves64, p) * weights.double()).sum().backward()
    for name, leaf, leaf64 in zip(("x", "lora_a", "lora_b", "sigma"), leaves, leaves64):
        if leaf is not None:
            torch.testing.assert_close(leaf.grad.double(), leaf64.grad, rtol=1e-5, atol=1e-5, msg=f"grad of {name}")


def test_public_out_path_is_differentiable():
    """With grads required, out= adds the functional term (the in-place kernel has no autograd)."""
    p = make_problem(10, 16, 12, 4, 3, 1, sigma_kind="full", seed=12)
    x = p.x.clone().requires_grad_(True)
    sigma = p.sigma.clone().requires_grad_(True)
    base = torch.randn(10, 20)
    out = lolakernels.shared_basis_lora(x, p.lora_a, p.lora_b, sigma, p.ids, scale=p.scale, out=base.clone(),
                                        out_slice=(8, 12))
    out.square().sum().backward()
    x64 = p.x.double().requires_grad_(True)
    sigma64 = p.sigma.double().requires_grad_(True)
    expected = base.double().clone()
    expected[:, 8:] += _fp64_term(x64, p.lora_a.double(), p.lora_b.double(), sigma64, p)
    expected.square().sum().backward()
    torch.testing.assert_close(out.detach().double(), expected.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sigma.grad.double(), sigma64.grad, rtol=1e-5, atol=1e-5)


def test_multi_lora_gradients_through_per_adapter_scale():
    p = make_problem(8, 12, 9, 4, 3, 3, sigma_kind="none", with_ranks=True, with_adapter_scale=True, seed=9)
    p.basis_of = torch.arange(3, dtype=torch.int32)
    lora_a = p.lora_a.clone().requires_grad_(True)
    lora_b = p.lora_b.clone().requires_grad_(True)
    lolakernels.multi_lora(p.x, lora_a, lora_b, p.ids, scale=p.adapter_scale, ranks=p.ranks).sum().backward()
    a64 = p.lora_a.double().requires_grad_(True)
    b64 = p.lora_b.double().requires_grad_(True)
    p.scale = 1.0
    _fp64_term(p.x.double(), a64, b64, None, p).sum().backward()
    torch.testing.assert_close(lora_a.grad.double(), a64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lora_b.grad.double(), b64.grad, rtol=1e-5, atol=1e-6)
