"""pytest-benchmark view of the AWSVD benchmark (the CLI writes the full report):

    pytest benchmarks/bench_awsvd.py --benchmark-enable --benchmark-group-by=param:case

Each case times every route on one matrix, so pytest-benchmark's table compares them side by
side with the full-SVD route. `lolakernels bench awsvd` runs the whole grid, also reports the
weighted error against the optimum, and writes JSON + markdown + PNG to benchmarks/results/.
"""
import functools

import pytest

from lolakernels.benchmarking.awsvd import Case, full_grid, make_problem
from lolakernels.compress.weighted_svd import awsvd

CASES = [(case, rank) for case in full_grid() for rank in case.ranks]
ROUTES = {"exact": dict(method="exact"), "randomized": dict(method="randomized"),
          "randomized-tol1e-3": dict(method="randomized", tolerance=1e-3), "gram": dict(method="gram")}


@functools.lru_cache(maxsize=1)
def _problem(case: Case):
    return make_problem(case)


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0].d_out}x{c[0].d_in}-{c[0].spectrum}-k{c[1]}")
def test_awsvd(benchmark, case, route):
    shape, rank = case
    benchmark.group = f"{shape.d_out}x{shape.d_in} {shape.spectrum} rank {rank}"
    weight, scale = _problem(shape)
    benchmark.pedantic(awsvd, args=(weight, scale, rank), kwargs=ROUTES[route], rounds=2, warmup_rounds=0)
