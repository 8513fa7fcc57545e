"""pytest-benchmark view of the nf4 benchmark (the CLI writes the full report):

    pytest benchmarks/bench_nf4.py --benchmark-enable --benchmark-group-by=param:cfg

`lolakernels bench nf4` runs the grid with the cold-cache timing and the measured bandwidth, and
writes JSON + markdown to benchmarks/results/.
"""
import functools

import pytest
import torch

import lolakernels
from lolakernels.benchmarking.nf4 import Config, _Layer, full_grid


@functools.lru_cache(maxsize=1)
def _layer(out_features, in_features, dtype):
    return _Layer(out_features, in_features, getattr(torch, dtype))


@pytest.mark.parametrize("method", ["ours", "bnb_peft", "dense_lora"])
@pytest.mark.parametrize("cfg", full_grid(), ids=lambda c: f"{c.out_features}x{c.in_features}-M{c.tokens}-{c.dtype}")
def test_layer(benchmark, cfg: Config, method):
    benchmark.group = f"{cfg.out_features}x{cfg.in_features} M={cfg.tokens} {cfg.dtype}"
    layer = _layer(cfg.out_features, cfg.in_features, cfg.dtype)
    x = torch.randn(cfg.tokens, cfg.in_features).to(getattr(torch, cfg.dtype))
    fn = {
        "ours": lambda: lolakernels.nf4_lora_linear(x, layer.packed, layer.state, layer.lora_a, layer.lora_b,
                                                    layer.scale),
        "bnb_peft": lambda: layer.peft_nf4(x),
        "dense_lora": lambda: layer.peft_dense(x),
    }[method]
    with torch.no_grad():
        benchmark(fn)
