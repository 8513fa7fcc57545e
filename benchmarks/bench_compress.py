"""pytest-benchmark view of the compression speed benchmark (the CLI writes the full report):

    pytest benchmarks/bench_compress.py --benchmark-enable --benchmark-group-by=param:cfg

Each case times one `compress_adapters` call (library defaults) on N synthetic adapters of one
slot. `lolakernels bench compress` runs the issue's cases (N = 1000, r = 16, 4096 × 4096,
R ∈ {16, 64}) in fresh processes and writes time and peak memory to benchmarks/results/.
"""
import functools

import pytest

import lolakernels
from lolakernels.benchmarking.compress import Config, full_grid, quick_grid, synthetic_collection

CASES = quick_grid() + full_grid()


@functools.lru_cache(maxsize=1)
def _collection(adapters, lora_rank, d_in, d_out):
    return synthetic_collection(Config("jd-full", 16, adapters, lora_rank, d_in, d_out))


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: f"{c.method}-R{c.rank}-N{c.adapters}-d{c.d_out}")
def test_compress(benchmark, cfg):
    benchmark.group = f"N={cfg.adapters} r={cfg.lora_rank} {cfg.d_out}x{cfg.d_in}"
    adapters = _collection(cfg.adapters, cfg.lora_rank, cfg.d_in, cfg.d_out)
    benchmark.pedantic(lambda: lolakernels.compress_adapters(adapters, cfg.rank, method=cfg.method, progress=False),
                       rounds=1, iterations=1)
