"""pytest-benchmark view of the SVD merge benchmark (the CLI writes the full report):

    pytest benchmarks/bench_merge.py --benchmark-enable --benchmark-group-by=param:cfg

Each case merges 8 rank-16 adapters of one 1024×1024 weight with PEFT's add_weighted_adapter,
the same call under fast_merge, and svd_merge alone, so pytest-benchmark's table compares them
side by side. `lolakernels bench merge` runs the 4096×4096 cases and writes JSON + markdown to
benchmarks/results/.
"""
import functools

import pytest

from lolakernels.benchmarking.merge import Config, _Slot
from lolakernels.merge.factored_svd import COMBINATION_TYPES

CASES = [Config(combination, "float32", 8, 16, 1024, 1024) for combination in COMBINATION_TYPES]


@functools.lru_cache(maxsize=1)
def _slot(cfg):
    return _Slot(cfg)


@pytest.mark.parametrize("method", ["peft", "fast_merge", "svd_merge"])
@pytest.mark.parametrize("cfg", CASES, ids=lambda c: c.combination_type)
def test_merge(benchmark, cfg, method):
    from lolakernels.peft import fast_merge

    benchmark.group = f"{cfg.combination_type} {cfg.d_out}x{cfg.d_in} n={cfg.adapters} r={cfg.rank}"
    slot = _slot(cfg)
    if method == "svd_merge":
        benchmark.pedantic(slot.merge_function, rounds=3, iterations=1, warmup_rounds=1)
        return
    if method == "fast_merge":
        with fast_merge(slot.model):
            benchmark.pedantic(slot.merge, rounds=3, iterations=1)
        return
    benchmark.pedantic(slot.merge, rounds=1, iterations=1)
