"""The CUDA decode kernels and the Triton kernels through the public API, on a GPU.
Skipped with a reason where no CUDA GPU is visible (see conftest.py)."""
import pytest
import torch

import lolakernels
from lora_cases import assert_term_close, formula_fp64, make_problem

pytestmark = pytest.mark.gpu

GPU_SHAPES = [  # (T, d_in, d_out, R, N, C)
    (1, 4096, 4096, 16, 64, 1),
    (7, 33, 97, 13, 5, 3),
    (16, 256, 130, 64, 300, 4),
    (64, 1024, 520, 16, 1024, 8),
    (64, 96, 64, 128, 3, 1),
]


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "T{}_din{}_dout{}_R{}_N{}_C{}".format(*s))
@pytest.mark.parametrize("sigma_kind", ["none", "diag", "full"])
def test_decode_kernels_match_formula(use_backend, backend, dtype, shape, sigma_kind):
    use_backend(backend)
    p = make_problem(*shape, sigma_kind=sigma_kind, dtype=dtype, seed=sum(shape), device="cuda")
    base = torch.randn(shape[0], shape[2] + 8, dtype=dtype, device="cuda")
    out = base.clone()
    lolakernels.shared_basis_lora(p.x, p.lora_a, p.lora_b, p.sigma, p.ids, basis_of=p.basis_of, scale=p.scale,
                                  out=out, out_slice=(8, shape[2]))
    untouched = p.ids < 0
    assert torch.equal(out[:, :8], base[:, :8]) and torch.equal(out[untouched], base[untouched])
    p_cpu = make_problem(*shape, sigma_kind=sigma_kind, dtype=dtype, seed=sum(shape))
    expected = base[:, 8:].double().cpu() + formula_fp64(p_cpu)
    assert_term_close(out[:, 8:].cpu(), expected, p_cpu)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("tokens", [1, 64, 65, 300])
def test_default_selection_on_gpu(dtype, tokens, monkeypatch):
    monkeypatch.delenv("LOLA_BACKEND", raising=False)
    from lolakernels import _backends

    chosen = _backends.select(_backends.Case(torch.device("cuda"), dtype, tokens))
    assert chosen == ("cuda" if tokens <= 64 and dtype != torch.float32 else "triton")
    p = make_problem(tokens, 128, 96, 16, 32, 2, dtype=dtype, device="cuda")
    term = lolakernels.shared_basis_lora(p.x, p.lora_a, p.lora_b, p.sigma, p.ids, basis_of=p.basis_of)
    assert_term_close(term.cpu(), formula_fp64(make_problem(tokens, 128, 96, 16, 32, 2, dtype=dtype)),
                      make_problem(tokens, 128, 96, 16, 32, 2, dtype=dtype))


def test_decode_step_captures_in_a_cuda_graph():
    """Launch grids depend only on shapes: a step with validate=False replays from a CUDA graph."""
    p = make_problem(16, 512, 256, 16, 64, 2, dtype=torch.bfloat16, device="cuda")
    out = torch.zeros(16, 256, dtype=torch.bfloat16, device="cuda")
    lolakernels.shared_basis_lora(p.x, p.lora_a, p.lora_b, p.sigma, p.ids, basis_of=p.basis_of, out=out,
                                  validate=False)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.zero_()
        lolakernels.shared_basis_lora(p.x, p.lora_a, p.lora_b, p.sigma, p.ids, basis_of=p.basis_of, out=out,
                                      validate=False)
    p.ids.copy_(torch.randint(-1, 64, (16,), dtype=torch.int32, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    eager = lolakernels.shared_basis_lora(p.x, p.lora_a, p.lora_b, p.sigma, p.ids, basis_of=p.basis_of)
    torch.testing.assert_close(out, eager, rtol=1e-2, atol=1e-2)
