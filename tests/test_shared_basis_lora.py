"""shared_basis_lora / multi_lora on CPU backends vs the reference and an fp64 formula."""
import importlib
import os

import pytest
import torch

import lolakernels
from lolakernels.reference import lora_term
from conftest import CPU_BACKENDS
from lora_cases import assert_term_close, formula_fp64, make_problem

SHAPES = [  # (T, d_in, d_out, R, N, C)
    (0, 16, 8, 4, 3, 1),
    (1, 33, 97, 5, 1, 1),
    (1, 64, 48, 16, 40, 1),       # N > T, decode
    (7, 33, 97, 13, 5, 3),        # odd everything, several clusters
    (37, 130, 70, 16, 9, 1),
    (64, 257, 129, 7, 200, 4),    # N > T, odd sizes, tails in every dimension
    (130, 96, 64, 32, 12, 2),
    # Clusters with >= 16 tokens take the packed shrink: R > 64 (a second, partial rank tile),
    # odd d_in spanning two chunks (an odd last pair), a cluster below the threshold beside them.
    (90, 1031, 40, 80, 6, 2),
    (61, 33, 17, 3, 2, 1),
    # Clusters below 16 tokens take the dot-product shrink, whose rank tiles are split across
    # items when there are few groups: one cluster with several token tiles, a partial last rank
    # tile and d_in over two chunks (its expand on panels); then clusters of about 7 tokens,
    # which expand from lora_b's rows in several calls each.
    (15, 1100, 50, 37, 5, 1),
    (22, 70, 33, 13, 40, 3),
    # A packed cluster of fewer token tiles than two per thread: its ranks are cut into slices of
    # whole vectors, the last one partial, one slice over two packed rank tiles (R = 150).
    (17, 1031, 40, 50, 3, 1),
    (20, 129, 40, 150, 4, 1),
]
BACKEND_IDS = [f"{b}-{isa}" if isa else b for b, isa in CPU_BACKENDS]


@pytest.mark.parametrize("backend,isa", CPU_BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}_din{}_dout{}_R{}_N{}_C{}".format(*s))
@pytest.mark.parametrize("sigma_kind", ["none", "diag", "full"])
def test_fp32_matches_formula_and_reference(use_backend, backend, isa, shape, sigma_kind):
    use_backend(backend, isa)
    p = make_problem(*shape, sigma_kind=sigma_kind, seed=sum(shape))
    oracle = formula_fp64(p)
    term = lolakernels.shared_basis_lora(p.x, p.lora_a, p.lora_b, p.sigma, p.ids, basis_of=p.basis_of, scale=p.scale)
    assert term.dtype == torch.float32
    assert_term_close(term, oracle, p)
    assert_term_close(lora_term(*p.args()), oracle, p, "reference")


# Every low-precision dtype each backend claims: reference bf16 + fp16, cpu bf16.
LOW_PRECISION = [(b, isa, torch.bfloat16) for b, isa in CPU_BACKENDS] + [("reference", None, torch.float16)]


@pytest.mark.parametrize("backend,isa,dtype", LOW_PRECISION,
                         ids=[f"{b}-{isa}-{str(d)[6:]}" for b, isa, d in LOW_PRECISION])
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3], SHAPES[5], SHAPES[6], SHAPES[7], SHAPES[8], SHAPES[9],
                                   SHAPES[11]], ids=lambda s: f"T{s[0]}_R{s[3]}_C{s[5]}")
@pytest.mark.parametrize("sigma_kind", ["diag", "full"])
def test_low_precision_within_twice_plain_torch_error(use_backend, backend, isa, dtype, shape, sigma_kind):
    use_backend(backend, isa)
    p = make_problem(*shape, sigma_kind=sigma_kind, dtype=dtype, seed=3)
    term = lolakernels.shared_basis_lora(p.x, p.lora_a, p.lora_b, p.sigma, p.ids, basis_of=p.basis_of, scale=p.scale)
    assert term.dtype == dtype
    assert_term_close(term, formula_fp64(p), p)


@pytest.mark.parametrize("backend,isa", [c for c in CPU_BACKENDS if c[0] == "cpu"],
                         ids=[i for c, i in zip(CPU_BACKENDS, BACKEND_IDS) if c[0] == "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(17, 1031, 40, 50, 3, 1), (20, 129, 40, 150, 4, 1), (40, 300, 33, 70, 5, 2)],
                         ids=lambda s: f"T{s[0]}_R{s[3]}_C{s[5]}")
def test_same_bits_for_every_thread_count(use_backend, backend, isa, dtype, shape):
    """However the packed shrink cuts its work (token tiles, rank slices, more pieces than the
    runtime's threads), every h element is summed by one piece in one order: the same bits."""
    use_backend(backend, isa)
    p = make_problem(*shape, sigma_kind="full", dtype=dtype, seed=5)
    threads = torch.get_num_threads()
    terms = []
    try:
        for count in (1, 2, 3, 8):
            torch.set_num_threads(count)
            terms.append(lolakernels.shared_basis_lora(p.x, p.lora_a, p.lora_b, p.sigma, p.ids, basis_of=p.basis_of,
                                                       scale=p.scale))
    finally:
        torch.set_num_threads(threads)
    assert_term_close(terms[0], formula_fp64(p), p)
    for count, term in zip((2, 3, 8), terms[1:]):
        assert torch.equal(term, terms[0]), f"{count} threads changed the result"


@pytest.mark.parametrize("backend,isa", CPU_BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_out_accumulates_into_slice_only(use_backend, backend, isa, dtype):
    """out_slice writes columns [offset, offset+d_out) of the rows with an adapter; nothing else."""
    use_backend(backend, isa)
    p = make_problem(23, 40, 24, 6, 5, 2, sigma_kind="full", dtype=dtype, seed=11)
    base = torch.randn(23, 3 * 24 + 5, dtype=dtype)
    out = base.clone()
    returned = lolakernels.shared_basis_lora(p.x, p.lora_a, p.lora_b, p.sigma, p.ids, basis_of=p.basis_of,
                                             scale=p.scale, out=out, out_slice=(24 + 3, 24))
    assert returned is out
    expected = base.double().clone()
    expected[:, 27:51] += formula_fp64(p)
    outside = torch.ones_like(out, dtype=torch.bool)
    outside[:, 27:51] = False
    outside[p.ids < 0] = True
    assert torch.equal(out[outside], base[outside]), "columns outside the slice or rows with id -1 changed"
    # One rounding of (base + term): within half an ulp of the exact sum, plus the term's error.
    assert_term_close(out[:, 27:51], expected[:, 27:51], p, "out slice")


@pytest.mark.parametrize("backend,isa", CPU_BACKENDS, ids=BACKEND_IDS)
def test_every_id_minus_one_leaves_out_untouched(use_backend, backend, isa):
    use_backend(backend, isa)
    p = make_problem(9, 32, 16, 4, 3, 1, ids="none")
    out = torch.randn(9, 16)
    before = out.clone()
    lolakernels.shared_basis_lora(p.x, p.lora_a, p.lora_b, p.sigma, p.ids, out=out)
    assert torch.equal(out, before)
    assert torch.equal(lolakernels.shared_basis_lora(p.x, p.lora_a, p.lora_b, p.sigma, p.ids), torch.zeros(9, 16))


@pytest.mark.parametrize("backend,isa", CPU_BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 48, 40, 8, 1), (5, 33, 21, 6, 9), (70, 64, 130, 16, 64)],
                         ids=lambda s: "T{}_N{}".format(s[0], s[4]))
def test_multi_lora_with_scales_and_true_ranks(use_backend, backend, isa, dtype, shape):
    """Padded adapters with garbage in the padding: ranks= must make the padding irrelevant."""
    use_backend(backend, isa)
    num_tokens, d_in, d_out, rank, num_adapters = shape
    p = make_problem(num_tokens, d_in, d_out, rank, num_adapters, num_adapters, sigma_kind="none", dtype=dtype,
                     with_ranks=True, with_adapter_scale=True, seed=5)
    p.basis_of = torch.arange(num_adapters, dtype=torch.int32)
    term = lolakernels.multi_lora(p.x, p.lora_a, p.lora_b, p.ids, scale=p.adapter_scale, ranks=p.ranks)
    p.scale = 1.0
    oracle = formula_fp64(p)
    assert_term_close(term, oracle, p) if dtype == torch.float32 else _assert_bf16_close(term, oracle)
    # The same adapters with the padding zeroed and no ranks= give the same result.
    keep = torch.arange(rank)[None, :] < p.ranks[:, None]
    zeroed_a = p.lora_a * keep[:, :, None].to(dtype)
    zeroed_b = p.lora_b * keep[:, None, :].to(dtype)
    plain = lolakernels.multi_lora(p.x, zeroed_a, zeroed_b, p.ids, scale=p.adapter_scale)
    assert torch.allclose(plain.float(), term.float(), rtol=0, atol=1e-5 if dtype == torch.float32 else 0)


# Decode (one or two tokens per adapter) expands straight from lora_b's rows, with the rank steps
# unrolled for 1-4 steps of 16 (fp32) or 32 (bf16 pairs) ranks and a loop beyond: cover each count,
# a partial last step, and d_out ending inside a 16-column block of a partial 32-column item.
@pytest.mark.parametrize("backend,isa", CPU_BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rank", [5, 16, 33, 48, 64, 72, 130])
def test_decode_row_expand_every_rank_step_count(use_backend, backend, isa, dtype, rank):
    use_backend(backend, isa)
    p = make_problem(9, 40, 83, rank, 7, 7, sigma_kind="none", dtype=dtype, seed=rank)
    p.basis_of = torch.arange(7, dtype=torch.int32)
    p.ids = torch.tensor([0, 1, 1, 2, -1, 3, 4, 5, 6], dtype=torch.int32)  # groups of one and two tokens
    term = lolakernels.multi_lora(p.x, p.lora_a, p.lora_b, p.ids, scale=p.scale)
    assert_term_close(term, formula_fp64(p), p)


# A pair of tokens on one adapter at bf16 rank <= 16 shares each lora_b row's load and product
# (two tokens in the two halves of one VDPBF16PS); each token's sums must be those it gets alone,
# at every rank up to 16 (rows shorter than a half), with d_out ending inside a 16-column block.
@pytest.mark.parametrize("backend,isa", CPU_BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("rank", [1, 2, 7, 15, 16, 17])
def test_bf16_token_pairs_expand_as_each_token_alone(use_backend, backend, isa, rank):
    use_backend(backend, isa)
    p = make_problem(8, 40, 83, rank, 4, 4, sigma_kind="none", dtype=torch.bfloat16, seed=30 + rank)
    p.basis_of = torch.arange(4, dtype=torch.int32)
    p.ids = torch.tensor([0, 0, 1, 1, 2, -1, 3, 3], dtype=torch.int32)  # pairs, a single, a skipped token
    pairs = lolakernels.multi_lora(p.x, p.lora_a, p.lora_b, p.ids, scale=p.scale)
    alone = torch.cat([lolakernels.multi_lora(p.x[t:t + 1], p.lora_a, p.lora_b, p.ids[t:t + 1], scale=p.scale)
                       for t in range(8)])
    assert torch.equal(pairs, alone)
    _assert_bf16_close(pairs, formula_fp64(p))
    assert torch.equal(pairs[5], torch.zeros(83, dtype=torch.bfloat16))


# Sums that are fp32 denormals must round to the bf16 denormal, as torch rounds them (VCVTNEPS2BF16,
# which the AVX512-BF16 kernels narrow with, flushes them to zero). Every other column holds normal
# values in the same vectors, and each expand path is taken: panels (a group of 20 tokens), rows
# (groups of at most 8 tokens), and token pairs sharing a VDPBF16PS (rank <= 16).
@pytest.mark.parametrize("backend,isa", CPU_BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("tokens,rank,clusters", [(20, 40, 1), (12, 40, 3), (8, 12, 4)],
                         ids=["panels", "rows", "token_pairs"])
def test_bf16_denormal_sums_are_kept_not_flushed(use_backend, backend, isa, tokens, rank, clusters):
    use_backend(backend, isa)
    d_out = 50
    p = make_problem(tokens, 24, d_out, rank, clusters, clusters, sigma_kind="none", dtype=torch.bfloat16,
                     seed=40 + rank)
    p.basis_of = torch.arange(clusters, dtype=torch.int32)
    p.ids = torch.arange(tokens, dtype=torch.int32) // 2 % clusters  # pairs of tokens on one adapter
    tiny_cols = torch.arange(d_out) % 3 == 0
    p.lora_b[:, tiny_cols, :] = 0  # these columns' LoRA sums are exactly zero
    generator = torch.Generator().manual_seed(rank)
    out = torch.randn(tokens, d_out, generator=generator).to(torch.bfloat16)
    denormals = torch.tensor([1e-39, -3e-39, 2e-40, 9e-41], dtype=torch.bfloat16)
    assert (denormals != 0).all() and (denormals.float().abs() < torch.finfo(torch.float32).tiny).all()
    out[:, tiny_cols] = denormals[torch.arange(int(tiny_cols.sum())) % 4]
    before = out.clone()
    lolakernels.multi_lora(p.x, p.lora_a, p.lora_b, p.ids, scale=p.scale, out=out)
    assert torch.equal(out[:, tiny_cols], before[:, tiny_cols])
    _assert_bf16_close(out[:, ~tiny_cols] - before[:, ~tiny_cols], formula_fp64(p)[:, ~tiny_cols])


def _assert_bf16_close(term, oracle):
    magnitude = float(oracle.abs().max()) if oracle.numel() else 1.0
    error = float((term.double() - oracle).abs().max()) if oracle.numel() else 0.0
    assert error <= 8e-3 * magnitude, f"bf16 error {error} vs |term| {magnitude}"


@pytest.mark.parametrize("backend,isa", CPU_BACKENDS, ids=BACKEND_IDS)
def test_multi_lora_scalar_scale_and_int64_ids(use_backend, backend, isa):
    use_backend(backend, isa)
    p = make_problem(12, 20, 10, 4, 3, 3, sigma_kind="none", seed=8)
    p.basis_of = torch.arange(3, dtype=torch.int32)
    term = lolakernels.multi_lora(p.x, p.lora_a, p.lora_b, p.ids.long(), scale=p.scale)
    assert_term_close(term, formula_fp64(p), p)


def test_cpu_kernel_agrees_across_instruction_sets(use_backend):
    """The AVX-512 paths and the portable path compute the same sums (up to summation order)."""
    results = {}
    for backend, isa in CPU_BACKENDS:
        if backend != "cpu":
            continue
        use_backend(backend, isa)
        p = make_problem(50, 300, 77, 11, 30, 3, sigma_kind="full", dtype=torch.bfloat16, seed=2)
        results[isa] = lolakernels.shared_basis_lora(p.x, p.lora_a, p.lora_b, p.sigma, p.ids, basis_of=p.basis_of)
    reference = results.pop("scalar")
    for isa, result in results.items():
        differing = (result.float() - reference.float()).abs() > 8e-3 * reference.float().abs().max()
        assert not differing.any(), f"{isa} differs from scalar at {differing.nonzero()[:5].tolist()}"


def test_default_backend_on_cpu_is_the_cpu_extension(monkeypatch):
    from lolakernels import _backends

    monkeypatch.delenv("LOLA_BACKEND", raising=False)
    assert _backends.select(_backends.Case(torch.device("cpu"), torch.float32, 8)) == "cpu"
    assert _backends.select(_backends.Case(torch.device("cpu"), torch.float16, 8)) == "reference"


def test_memoized_backend_choice_follows_lolabackend(monkeypatch):
    """The choice is cached per call, but setting LOLA_BACKEND between calls still takes effect."""
    from lolakernels import _backends

    fp32, fp16 = (_backends.Case(torch.device("cpu"), dtype, 8) for dtype in (torch.float32, torch.float16))
    monkeypatch.delenv("LOLA_BACKEND", raising=False)
    assert _backends.select(fp32) == "cpu"
    assert _backends.select(fp16) == "reference"
    monkeypatch.setenv("LOLA_BACKEND", "reference")
    assert _backends.select(fp32) == "reference"
    monkeypatch.setenv("LOLA_BACKEND", "cpu")
    with pytest.raises(RuntimeError, match="LOLA_BACKEND=cpu cannot run this call"):
        _backends.select(fp16)
    monkeypatch.delenv("LOLA_BACKEND")
    assert _backends.select(fp32) == "cpu"


def test_plain_cpu_run_skips_the_full_checks_and_matches_the_general_path(monkeypatch):
    """The per-layer CPU call runs without the full checks and the backend walk, with the same numbers."""
    from lolakernels import _backends, _ops

    monkeypatch.delenv("LOLA_BACKEND", raising=False)
    p = make_problem(9, 40, 33, 5, 7, 2, sigma_kind="diag", seed=4)
    general = lolakernels.shared_basis_lora(p.x, p.lora_a, p.lora_b, p.sigma, p.ids, basis_of=p.basis_of)

    def refuse(*args, **kwargs):
        raise AssertionError("the plain CPU call went through the full path")

    monkeypatch.setattr(_ops, "check_shared_basis_args", refuse)
    monkeypatch.setattr(_backends, "select", refuse)
    fast = lolakernels.shared_basis_lora(p.x, p.lora_a, p.lora_b, p.sigma, p.ids, basis_of=p.basis_of)
    assert torch.equal(fast, general)
    out = torch.ones(9, 40)
    lolakernels.shared_basis_lora(p.x, p.lora_a, p.lora_b, p.sigma, p.ids, basis_of=p.basis_of, out=out,
                                  out_slice=(3, 33))
    assert torch.equal(out[:, 3:36], 1 + general) and torch.equal(out[:, :3], torch.ones(9, 3))
    # A forced backend other than cpu is not a plain CPU call.
    monkeypatch.setenv("LOLA_BACKEND", "reference")
    with pytest.raises(AssertionError, match="full path"):
        lolakernels.shared_basis_lora(p.x, p.lora_a, p.lora_b, p.sigma, p.ids, basis_of=p.basis_of)


def test_weights_requiring_grad_take_the_plain_cpu_run_under_no_grad(monkeypatch):
    """A PEFT model's trainable weights serving under no_grad / inference_mode: nothing needs
    autograd, so the call goes straight to the kernel, with the numbers of the general path; with
    grad mode on it takes the autograd path and gives a gradient."""
    from lolakernels import _backends, _ops

    monkeypatch.delenv("LOLA_BACKEND", raising=False)
    p = make_problem(9, 40, 33, 5, 7, 2, sigma_kind="full", seed=8)
    general = lolakernels.shared_basis_lora(p.x, p.lora_a, p.lora_b, p.sigma, p.ids, basis_of=p.basis_of)
    lora_a, lora_b = p.lora_a.clone().requires_grad_(), p.lora_b.clone().requires_grad_()
    sigma = p.sigma.clone().requires_grad_()

    def refuse(*args, **kwargs):
        raise AssertionError("the plain CPU call went through the full path")

    with monkeypatch.context() as patched:
        patched.setattr(_ops, "check_shared_basis_args", refuse)
        patched.setattr(_backends, "select", refuse)
        patched.setattr(importlib.import_module("lolakernels.ops.shared_basis_lora"), "_apply", refuse)
        for mode in (torch.no_grad, torch.inference_mode):
            with mode():
                term = lolakernels.shared_basis_lora(p.x, lora_a, lora_b, sigma, p.ids, basis_of=p.basis_of)
            assert torch.equal(term, general) and not term.requires_grad
    term = lolakernels.shared_basis_lora(p.x, lora_a, lora_b, sigma, p.ids, basis_of=p.basis_of)
    assert term.requires_grad
    term.sum().backward()
    assert lora_a.grad is not None and lora_a.grad.abs().sum() > 0


def test_eager_cpu_call_of_multi_lora_and_one_basis_skips_the_full_checks(monkeypatch):
    """multi_lora (implied arange basis, per-adapter scale, true ranks) and a one-basis call
    without basis_of take the same straight path to the kernel as a call with basis_of, with the
    numbers of the general path (the full checks and the backend walk)."""
    from lolakernels import _backends, _ops

    monkeypatch.delenv("LOLA_BACKEND", raising=False)
    p = make_problem(11, 36, 29, 6, 5, 5, sigma_kind="none", with_ranks=True, with_adapter_scale=True, seed=6)
    single = make_problem(7, 20, 18, 4, 3, 1, sigma_kind="full", seed=7)
    calls = {
        "multi_lora": lambda **kw: lolakernels.multi_lora(p.x, p.lora_a, p.lora_b, p.ids, scale=p.adapter_scale,
                                                          ranks=p.ranks, **kw),
        "multi_lora_float_scale": lambda **kw: lolakernels.multi_lora(p.x, p.lora_a, p.lora_b, p.ids, scale=0.25, **kw),
        "one_basis": lambda **kw: lolakernels.shared_basis_lora(single.x, single.lora_a, single.lora_b, single.sigma,
                                                                single.ids, scale=0.5, **kw),
    }
    with monkeypatch.context() as patched:
        patched.setattr(_ops, "run_plain_cpu", lambda *args: None)
        general = {name: call() for name, call in calls.items()}

    def refuse(*args, **kwargs):
        raise AssertionError("the plain CPU call went through the full path")

    monkeypatch.setattr(_ops, "check_shared_basis_args", refuse)
    monkeypatch.setattr(_backends, "select", refuse)
    for name, call in calls.items():
        assert torch.equal(call(), general[name]), name
        out = torch.full((general[name].shape[0], general[name].shape[1] + 5), 2.0)
        assert call(out=out, out_slice=(5, general[name].shape[1])) is out
        assert torch.equal(out[:, 5:], 2 + general[name]) and torch.equal(out[:, :5], torch.full_like(out[:, :5], 2.0))
    # An int scale and int64 ranks and ids are not taken as they are: the general path converts
    # them first, to the same numbers.
    converted = lolakernels.multi_lora(p.x, p.lora_a, p.lora_b, p.ids.long(), scale=p.adapter_scale,
                                       ranks=p.ranks.long())
    assert torch.equal(converted, general["multi_lora"])
    assert torch.equal(lolakernels.multi_lora(p.x, p.lora_a, p.lora_b, p.ids, scale=1),
                       lolakernels.multi_lora(p.x, p.lora_a, p.lora_b, p.ids, scale=1.0))


def test_general_cpu_path_raises_rather_than_skip_a_call_the_kernel_declines(monkeypatch):
    """The general path's CPU backend runs the same C++ entry point as the per-layer call. Should
    that entry point ever decline arguments the checks passed, the call raises; it never returns
    out unchanged as if the term were zero."""
    from lolakernels import _ops

    p = make_problem(5, 12, 10, 4, 3, 2, sigma_kind="diag", seed=11)
    monkeypatch.delenv("LOLA_BACKEND", raising=False)
    monkeypatch.setattr(_ops, "run_plain_cpu", lambda *args: None)
    monkeypatch.setattr(lolakernels.cpu, "run_vouched_shared_basis_lora", lambda *args: False)
    with pytest.raises(RuntimeError, match="declined a call that passed the argument checks"):
        lolakernels.shared_basis_lora(p.x, p.lora_a, p.lora_b, p.sigma, p.ids, basis_of=p.basis_of)


def _plain(p, **overrides):
    """Whether run_plain_cpu takes the call; one it declines must leave out as it was."""
    from lolakernels import _ops

    args = dict(x=p.x, lora_a=p.lora_a, lora_b=p.lora_b, sigma=p.sigma, ids=p.ids, basis_of=p.basis_of, scale=1.0,
                adapter_scale=None, ranks=None, out=None, out_offset=0)
    args.update(overrides)
    before = args["out"].clone() if isinstance(args["out"], torch.Tensor) and args["out"].is_cpu else None
    taken = _ops.run_plain_cpu(**args) is not None
    if not taken and before is not None:
        assert torch.equal(args["out"], before), "a declined call wrote out"
    return taken


@pytest.mark.parametrize("override", [
    dict(x=lambda p: p.x[:, :39]), dict(x=lambda p: p.x.t()), dict(x=lambda p: p.x[0]), dict(x=lambda p: [1.0]),
    dict(x=lambda p: p.x.half()), dict(x=lambda p: p.x.double()), dict(x=lambda p: p.x[None]),
    dict(x=lambda p: p.x.to("meta")), dict(x=lambda p: torch.stack([p.x, p.x], -1)[..., 0]),
    dict(lora_a=lambda p: p.lora_a[:1]), dict(lora_a=lambda p: p.lora_a.transpose(1, 2).contiguous().transpose(1, 2)),
    dict(lora_a=lambda p: p.lora_a.bfloat16()), dict(lora_a=lambda p: p.lora_a.to("meta")),
    dict(lora_a=lambda p: p.lora_a[:, :, :-1]), dict(lora_a=lambda p: p.lora_a.to_sparse()),
    dict(lora_b=lambda p: p.lora_b[:, :, :4].contiguous()),
    dict(lora_b=lambda p: p.lora_b.transpose(0, 1).contiguous().transpose(0, 1)), dict(lora_b=lambda p: p.lora_b[0]),
    dict(lora_b=lambda p: p.lora_b[:1]),
    dict(sigma=lambda p: p.sigma[:6]), dict(sigma=lambda p: p.sigma[:, :4]), dict(sigma=lambda p: p.sigma[None]),
    dict(sigma=lambda p: p.sigma.t().contiguous().t()), dict(sigma=lambda p: p.sigma.bfloat16()),
    dict(sigma=lambda p: p.sigma[:, :, None].expand(7, 5, 4).contiguous()), dict(sigma=lambda p: [1.0]),
    dict(ids=lambda p: p.ids[:8]), dict(ids=lambda p: p.ids.long()), dict(ids=lambda p: p.ids[None]),
    dict(ids=lambda p: p.ids.to("meta")), dict(ids=lambda p: torch.stack([p.ids, p.ids], 1)[:, 0]),
    dict(basis_of=lambda p: p.basis_of.float()), dict(basis_of=lambda p: p.basis_of[None]),
    dict(basis_of=lambda p: p.basis_of.to(torch.uint32)),
    dict(adapter_scale=lambda p: torch.ones(6)), dict(adapter_scale=lambda p: torch.ones(7, dtype=torch.float64)),
    dict(adapter_scale=lambda p: torch.ones(14)[::2]),
    dict(ranks=lambda p: torch.ones(7, dtype=torch.int64)), dict(ranks=lambda p: torch.ones(6, dtype=torch.int32)),
    dict(scale=lambda p: float("nan")), dict(scale=lambda p: float("inf")), dict(scale=lambda p: 1),
    dict(out=lambda p: torch.zeros(8, 40)), dict(out=lambda p: torch.zeros(9, 40, dtype=torch.bfloat16)),
    dict(out=lambda p: torch.zeros(40, 9).t()), dict(out=lambda p: torch.zeros(9, 40), out_offset=lambda p: 8),
    dict(out=lambda p: torch.zeros(9, 40), out_offset=lambda p: -1), dict(out=lambda p: torch.zeros(9)),
    dict(out=lambda p: torch.zeros(9, 40, device="meta")), dict(out=lambda p: torch.zeros(9, 40, 2)[..., 0]),
], ids=lambda override: "-".join(override))
def test_plain_cpu_run_declines_what_the_full_checks_refuse(override):
    """Each of these fails a check of check_shared_basis_args, so the fast path must not take it."""
    p = make_problem(9, 40, 33, 5, 7, 2, sigma_kind="diag", seed=4)
    assert _plain(p) and _plain(p, out=torch.zeros(9, 40), out_offset=7)
    assert not _plain(p, **{key: make(p) for key, make in override.items()})


def test_env_reads_follow_os_environ(monkeypatch):
    from lolakernels import _env

    monkeypatch.delenv("LOLA_TEST_VARIABLE", raising=False)
    assert _env.read("LOLA_TEST_VARIABLE") == ""
    monkeypatch.setenv("LOLA_TEST_VARIABLE", "cpu")
    assert _env.read("LOLA_TEST_VARIABLE") == "cpu"
    os.environ["LOLA_TEST_VARIABLE"] = "reference"
    assert _env.read("LOLA_TEST_VARIABLE") == "reference"
    del os.environ["LOLA_TEST_VARIABLE"]
    assert _env.read("LOLA_TEST_VARIABLE") == ""


@pytest.mark.skipif(not lolakernels.cpu.available()[0], reason="lolakernels._C is not built")
def test_cpu_isa_follows_lola_cpu_isa_between_calls(monkeypatch):
    """isa() keeps its answer per setting, but a change of LOLA_CPU_ISA takes effect at once and
    a bad value is refused every time, not once."""
    from lolakernels import cpu

    module = cpu._module()
    monkeypatch.delenv("LOLA_CPU_ISA", raising=False)
    assert cpu.isa() == module.best_isa()
    monkeypatch.setenv("LOLA_CPU_ISA", "scalar")
    assert cpu.isa() == module.ISA_SCALAR
    monkeypatch.setenv("LOLA_CPU_ISA", " Scalar ")
    assert cpu.isa() == module.ISA_SCALAR
    monkeypatch.setenv("LOLA_CPU_ISA", "sse9")
    for _ in range(2):
        with pytest.raises(ValueError, match="LOLA_CPU_ISA='sse9'"):
            cpu.isa()
    monkeypatch.delenv("LOLA_CPU_ISA")
    assert cpu.isa() == module.best_isa()


def test_implied_basis_of_cached_under_inference_mode_still_serves_autograd():
    """multi_lora's arange basis_of is kept between eager calls; one made under inference_mode
    must not break a later call that needs gradients."""
    x = torch.randn(5, 12)
    lora_a, lora_b = torch.randn(3, 4, 12), torch.randn(3, 10, 4)
    ids = torch.tensor([0, 2, -1, 1, 2], dtype=torch.int32)
    with torch.inference_mode():
        first = lolakernels.multi_lora(x, lora_a, lora_b, ids, scale=0.5)
    lora_a.requires_grad_(True)
    term = lolakernels.multi_lora(x, lora_a, lora_b, ids, scale=0.5)
    term.sum().backward()
    assert torch.allclose(term.detach(), first)
    assert lora_a.grad is not None and lora_a.grad.abs().sum() > 0
