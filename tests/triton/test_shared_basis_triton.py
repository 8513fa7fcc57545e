"""Triton shared-basis LoRA forward vs the PyTorch oracle and an fp64 per-token formula.

Runs on a CUDA GPU, or on CPU under the Triton interpreter (``TRITON_INTERPRET=1`` must be
set before Python starts). The interpreter is slow, so shapes are small and the parameter
space is covered by a curated list of cases rather than a full cartesian product.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

if not (os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()):
    pytest.skip("Triton kernels need a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)

from lolakernels.reference.shared_basis_lora import shared_basis_lora_ as reference_  # noqa: E402
from lolakernels.triton import shared_basis_lora as triton_module  # noqa: E402
from lolakernels.triton.shared_basis_lora import shared_basis_lora_  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter computes bf16 wrongly, so bf16 is only checked on a real GPU.
DTYPES = (torch.float32, torch.float16) + ((torch.bfloat16,) if torch.cuda.is_available() else ())
SHAPES = ((33, 97, 5), (64, 48, 16), (40, 24, 13))  # (d_in, d_out, R)
TOKEN_COUNTS = (0, 1, 7, 70, 130)  # 70 and 130 take the prefill path
SIGMA_KINDS = (None, "diag", "full")
OUT_OFFSET = 3
OUT_EXTRA_COLUMNS = 5  # out is wider than d_out on both sides of the slice
X_ROW_PADDING = 3  # x rows are strided: x.stride(0) > d_in
SCALE = 0.75


@dataclass
class Problem:
    out: torch.Tensor
    x: torch.Tensor
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    sigma: Optional[torch.Tensor]
    ids: torch.Tensor
    basis_of: torch.Tensor
    adapter_scale: Optional[torch.Tensor]
    ranks: Optional[torch.Tensor]

    def args(self, out: torch.Tensor):
        return (out, OUT_OFFSET, self.x, self.lora_a, self.lora_b, self.sigma, self.ids, self.basis_of,
                SCALE, self.adapter_scale, self.ranks)


def make_problem(
    num_tokens, d_in, d_out, rank, adapters, clusters, sigma_kind, dtype, *,
    with_ranks, with_adapter_scale, all_unassigned=False, seed=0,
) -> Problem:
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=generator) * std).to(dtype).to(DEVICE)

    # Scales chosen so h, g and the term are O(1), like out: a dropped or wrong piece shows.
    x = randn(num_tokens, d_in + X_ROW_PADDING)[:, :d_in]
    lora_a = randn(clusters, rank, d_in, std=d_in ** -0.5)
    lora_b = randn(clusters, d_out, rank, std=rank ** -0.5)
    if sigma_kind is None:
        sigma = None
    elif sigma_kind == "diag":
        sigma = randn(adapters, rank)
    else:
        sigma = randn(adapters, rank, rank, std=rank ** -0.5)
    if all_unassigned:
        ids = torch.full((num_tokens,), -1, dtype=torch.int32)
    else:
        ids = torch.randint(-1, adapters, (num_tokens,), generator=generator, dtype=torch.int32)
    basis_of = torch.randint(0, clusters, (adapters,), generator=generator, dtype=torch.int32)
    adapter_scale = torch.rand(adapters, generator=generator) + 0.5 if with_adapter_scale else None
    ranks = None
    if with_ranks:
        # Some adapters below the full rank, including rank 0, and at least one at R.
        ranks = torch.randint(0, rank + 1, (adapters,), generator=generator, dtype=torch.int32)
        ranks[0] = rank
    out = randn(num_tokens, OUT_OFFSET + d_out + OUT_EXTRA_COLUMNS)
    return Problem(
        out, x, lora_a, lora_b, sigma, ids.to(DEVICE), basis_of.to(DEVICE),
        None if adapter_scale is None else adapter_scale.to(DEVICE),
        None if ranks is None else ranks.to(DEVICE),
    )


def fp64_term(problem: Problem) -> torch.Tensor:
    """The LoRA term [T, d_out] in float64, written token by token straight from the contract."""
    x, lora_a, lora_b = problem.x.double().cpu(), problem.lora_a.double().cpu(), problem.lora_b.double().cpu()
    sigma = None if problem.sigma is None else problem.sigma.double().cpu()
    rank = lora_a.shape[1]
    term = torch.zeros(x.shape[0], lora_b.shape[1], dtype=torch.float64)
    for token, adapter in enumerate(problem.ids.tolist()):
        if adapter < 0:
            continue
        cluster = int(problem.basis_of[adapter])
        true_rank = rank if problem.ranks is None else int(problem.ranks[adapter])
        multiplier = SCALE * (1.0 if problem.adapter_scale is None else float(problem.adapter_scale[adapter]))
        h = lora_a[cluster] @ x[token]
        h[true_rank:] = 0
        if sigma is None:
            g = h
        elif sigma.dim() == 2:
            g = sigma[adapter] * h
        else:
            g = sigma[adapter] @ h
        g = multiplier * g
        g[true_rank:] = 0
        term[token] = lora_b[cluster] @ g
    return term


def naive_low_precision_out(problem: Problem) -> torch.Tensor:
    """out after a plain torch computation in the inputs' dtype (h, g and the term rounded)."""
    dtype = problem.x.dtype
    out = problem.out.clone()
    rank = problem.lora_a.shape[1]
    for token, adapter in enumerate(problem.ids.tolist()):
        if adapter < 0:
            continue
        cluster = int(problem.basis_of[adapter])
        true_rank = rank if problem.ranks is None else int(problem.ranks[adapter])
        multiplier = SCALE * (1.0 if problem.adapter_scale is None else float(problem.adapter_scale[adapter]))
        h = (problem.lora_a[cluster] @ problem.x[token]).to(dtype)
        h[true_rank:] = 0
        if problem.sigma is None:
            g = h
        elif problem.sigma.dim() == 2:
            g = problem.sigma[adapter] * h
        else:
            g = problem.sigma[adapter] @ h
        g = g * multiplier
        g[true_rank:] = 0
        target = out[token, OUT_OFFSET:OUT_OFFSET + problem.lora_b.shape[1]]
        target += problem.lora_b[cluster] @ g
    return out


def unit_in_last_place(magnitude: float, dtype: torch.dtype) -> float:
    return magnitude * torch.finfo(dtype).eps


def check_against_oracles(problem: Problem, actual: torch.Tensor) -> None:
    """Compares ``actual`` (out after the Triton op) with the oracle and the fp64 formula."""
    d_out = problem.lora_b.shape[1]
    dtype = problem.out.dtype
    columns = slice(OUT_OFFSET, OUT_OFFSET + d_out)

    # Outside the slice, and on rows of -1 tokens, out must be bit-for-bit unchanged.
    outside = torch.ones(problem.out.shape[1], dtype=torch.bool)
    outside[columns] = False
    assert torch.equal(actual[:, outside.to(actual.device)], problem.out[:, outside.to(actual.device)])
    unassigned = problem.ids < 0
    assert torch.equal(actual[unassigned], problem.out[unassigned])

    oracle_out = problem.out.clone()
    reference_(*problem.args(oracle_out))
    term = fp64_term(problem)
    exact = problem.out[:, columns].double().cpu() + term
    actual_slice = actual[:, columns].double().cpu()
    oracle_slice = oracle_out[:, columns].double().cpu()
    magnitude = max(exact.abs().max().item() if exact.numel() else 0.0, 1e-30)

    if dtype == torch.float32:
        # fp32 accumulation over at most a few dozen products: ~1e-5 of the output magnitude.
        tolerance = dict(rtol=1e-5, atol=1e-5 * magnitude)
        torch.testing.assert_close(actual_slice, exact, **tolerance)
        torch.testing.assert_close(actual_slice, oracle_slice, **tolerance)
        return

    # 16-bit: a correct kernel rounds once, so it is within one ulp of the exact result; the
    # bound allowed is twice the error of a plain torch computation in this dtype (which
    # rounds h, g and the term too), never below one ulp of the output magnitude. A dropped
    # term or a wrong Sigma moves outputs by O(magnitude), far above either.
    naive = naive_low_precision_out(problem)[:, columns].double().cpu()
    naive_error = (naive - exact).abs().max().item() if exact.numel() else 0.0
    atol = max(2.0 * naive_error, unit_in_last_place(magnitude, dtype))
    assert atol < 0.1 * magnitude, "test inputs too ill-conditioned to detect a wrong term"
    torch.testing.assert_close(actual_slice, exact, rtol=0.0, atol=atol)
    torch.testing.assert_close(actual_slice, oracle_slice, rtol=0.0, atol=atol)

    # One rounding, as in the oracle: both round nearly the same fp32 sum, so they differ by
    # at most one ulp of the larger result (plus fp32 noise, for sums that cancel). Rounding
    # h or g to the 16-bit dtype on the way fails this on the elements that cancel.
    larger = torch.maximum(actual_slice.abs(), oracle_slice.abs())
    finfo = torch.finfo(dtype)
    ulp = torch.where(
        larger >= finfo.tiny,
        torch.exp2(torch.floor(torch.log2(larger.clamp(min=finfo.tiny)))) * finfo.eps,
        torch.full_like(larger, finfo.tiny * finfo.eps),
    )
    out_before = problem.out[:, columns].double().cpu()
    # fp32 accumulation-order noise, generous (64 eps) yet far below one 16-bit ulp (2^-10).
    fp32_noise = 64 * torch.finfo(torch.float32).eps * (out_before.abs() + term.abs())
    excess = (actual_slice - oracle_slice).abs() - (ulp + fp32_noise)
    assert excess.numel() == 0 or excess.max().item() <= 0, "not within one ulp of the oracle"


def _curated_cases():
    """Every token count x shape x Sigma kind, with the other knobs rotated so that each value
    of (N, C, ranks, adapter_scale) meets every path and Sigma kind, plus a 16-bit pass."""
    cases = []
    for index, (num_tokens, shape, sigma_kind) in enumerate(
        itertools.product(TOKEN_COUNTS, SHAPES, SIGMA_KINDS)
    ):
        many_adapters = index % 2 == 0
        cases.append(dict(
            num_tokens=num_tokens, shape=shape, sigma_kind=sigma_kind,
            adapters=num_tokens + 3 if many_adapters else 1,  # N > T, or N = 1
            clusters=3 if (index // 2) % 2 == 0 else 1,
            with_ranks=index % 3 != 0,
            with_adapter_scale=index % 4 < 2,
            dtype=torch.float32, seed=index,
        ))
    for index, (num_tokens, sigma_kind) in enumerate(itertools.product(TOKEN_COUNTS, SIGMA_KINDS)):
        for dtype in DTYPES[1:]:
            cases.append(dict(
                num_tokens=num_tokens, shape=SHAPES[index % len(SHAPES)], sigma_kind=sigma_kind,
                adapters=num_tokens + 3 if index % 2 else 1, clusters=3 if index % 3 else 1,
                with_ranks=index % 2 == 0, with_adapter_scale=index % 3 != 1,
                dtype=dtype, seed=100 + index,
            ))
    return cases


def _case_id(case) -> str:
    d_in, d_out, rank = case["shape"]
    return (f"T{case['num_tokens']}-{d_in}x{d_out}r{rank}-{case['sigma_kind'] or 'plain'}"
            f"-N{case['adapters']}-C{case['clusters']}{'-ranks' if case['with_ranks'] else ''}"
            f"{'-ascale' if case['with_adapter_scale'] else ''}-{str(case['dtype']).split('.')[-1]}")


CASES = _curated_cases()


@pytest.mark.parametrize("case", CASES, ids=[_case_id(case) for case in CASES])
def test_matches_oracles(case):
    d_in, d_out, rank = case["shape"]
    problem = make_problem(
        case["num_tokens"], d_in, d_out, rank, case["adapters"], case["clusters"], case["sigma_kind"],
        case["dtype"], with_ranks=case["with_ranks"], with_adapter_scale=case["with_adapter_scale"],
        seed=case["seed"],
    )
    actual = problem.out.clone()
    shared_basis_lora_(*problem.args(actual))
    check_against_oracles(problem, actual)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [7, 70])
@pytest.mark.parametrize("sigma_kind", ["diag", "full"])
def test_all_tokens_unassigned_leave_out_untouched(num_tokens, sigma_kind, dtype):
    problem = make_problem(num_tokens, 33, 97, 5, 4, 3, sigma_kind, dtype,
                           with_ranks=True, with_adapter_scale=True, all_unassigned=True)
    actual = problem.out.clone()
    shared_basis_lora_(*problem.args(actual))
    assert torch.equal(actual, problem.out)


def test_dispatch_picks_prefill_for_many_tokens_and_decode_for_few(monkeypatch):
    calls = []
    monkeypatch.setattr(triton_module, "_prefill_", lambda *args: calls.append("prefill"))
    monkeypatch.setattr(triton_module, "_decode_", lambda *args: calls.append("decode"))
    for num_tokens in (0, 1, triton_module.PREFILL_MIN_TOKENS - 1, triton_module.PREFILL_MIN_TOKENS, 130):
        problem = make_problem(num_tokens, 16, 16, 4, 2, 1, None, torch.float32,
                               with_ranks=False, with_adapter_scale=False)
        triton_module.shared_basis_lora_(*problem.args(problem.out.clone()))
    assert calls == ["decode", "decode", "prefill", "prefill"]


# Each path run directly on token counts the dispatcher would send elsewhere, with block
# overrides that force several token tiles per cluster, several output tiles per program,
# chunked full-Sigma matvecs and several split-K partial sums per token.
PATH_CASES = [
    ("prefill", 7, (33, 97, 5), "full", {}),
    ("prefill", 50, (40, 24, 13), "diag",
     dict(block_m=16, block_n=16, block_k=16, output_tiles_per_program=1)),
    ("prefill", 50, (33, 97, 13), "full",
     dict(block_m=16, block_n=16, block_k=16, output_tiles_per_program=2)),
    ("prefill", 40, (24, 20, 64), "full", {}),  # R_pad 64: the Sigma matvec runs in j-chunks
    ("prefill", 20, (24, 20, 1), "full", {}),
    ("decode", 70, (33, 97, 5), "full", {}),
    ("decode", 5, (97, 33, 13), "diag", dict(block_k=16, k_splits=3, block_n=16, output_tiles_per_program=2)),
    ("decode", 5, (97, 33, 13), None, dict(block_k=16, k_splits=7, block_n=16, output_tiles_per_program=1)),
    ("decode", 6, (24, 20, 128), "full", {}),  # R_pad 128: the Sigma matvec runs in j-chunks
    ("decode", 6, (24, 20, 1), "full", {}),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "path, num_tokens, shape, sigma_kind, overrides", PATH_CASES,
    ids=[f"{case[0]}-T{case[1]}-r{case[2][2]}-{case[3]}-{len(case[4])}overrides" for case in PATH_CASES],
)
def test_each_path_directly(path, num_tokens, shape, sigma_kind, overrides, dtype):
    d_in, d_out, rank = shape
    problem = make_problem(num_tokens, d_in, d_out, rank, num_tokens + 2, 3, sigma_kind, dtype,
                           with_ranks=True, with_adapter_scale=True, seed=num_tokens + rank)
    actual = problem.out.clone()
    run_path = triton_module._prefill_ if path == "prefill" else triton_module._decode_
    run_path(*problem.args(actual), **overrides)
    check_against_oracles(problem, actual)


@pytest.mark.parametrize(
    "num_tokens, clusters, block_m", [(70, 3, 16), (130, 1, 64), (9, 20, 16), (33, 4, 16)]
)
def test_cluster_tiles_cover_each_assigned_token_once(num_tokens, clusters, block_m):
    generator = torch.Generator().manual_seed(num_tokens)
    adapters = 11
    ids = torch.randint(-1, adapters, (num_tokens,), generator=generator, dtype=torch.int32).to(DEVICE)
    basis_of = torch.randint(0, clusters, (adapters,), generator=generator, dtype=torch.int32).to(DEVICE)
    order, tile_cluster, tile_begin, tile_end = triton_module._cluster_tiles(ids, basis_of, clusters, block_m)
    # The tile table's size is a function of shapes only (no host sync to size the grid).
    assert tile_begin.numel() == -(-num_tokens // block_m) + min(clusters, num_tokens)
    covered = []
    for cluster, begin, end in zip(tile_cluster.tolist(), tile_begin.tolist(), tile_end.tolist()):
        assert 0 <= end - begin <= block_m
        tokens = order[begin:end].long()
        assert torch.all(basis_of[ids[tokens].long()] == cluster)
        covered += tokens.tolist()
    assert sorted(covered) == (ids >= 0).nonzero().squeeze(-1).tolist()
