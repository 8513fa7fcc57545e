"""pytest-benchmark view of the shared-basis benchmark (the CLI writes the full report):

    pytest benchmarks/bench_shared_basis.py --benchmark-enable --benchmark-group-by=param:case

Each case times one adapted 4096×4096 layer with every method, so pytest-benchmark's table
compares them side by side. `lolakernels bench shared-basis` runs the whole grid and writes
JSON + markdown + PNG to benchmarks/results/.
"""
import functools

import pytest
import torch
import torch.nn.functional as F

import lolakernels
from lolakernels.benchmarking.shared_basis import Config, _Adapters
from lolakernels.reference import shared_basis_lora_torch

CASES = [Config(dtype, 1, rank, tokens, adapters)
         for dtype in ("float32", "bfloat16") for rank in (16, 64) for tokens in (1, 16, 256)
         for adapters in (1, 64, 1024)]


@functools.lru_cache(maxsize=2)
def _adapters(dtype, rank, adapters):
    return _Adapters(Config(dtype, 1, rank, 1, adapters))


def _method(name, cfg):
    bank = _adapters(cfg.dtype, cfg.rank, cfg.adapters)
    generator = torch.Generator().manual_seed(cfg.tokens)
    x = torch.randn(cfg.tokens, cfg.d_in, generator=generator).to(getattr(torch, cfg.dtype))
    ids = torch.randint(0, cfg.adapters, (cfg.tokens,), generator=generator, dtype=torch.int32)
    if name == "base":
        return lambda: F.linear(x, bank.weight)
    if name == "shared_basis_lora":
        return lambda: lolakernels.shared_basis_lora(x, bank.lora_a, bank.lora_b, bank.sigma, ids,
                                                     basis_of=bank.basis_of, out=F.linear(x, bank.weight))
    if name == "composition":
        return lambda: F.linear(x, bank.weight) + shared_basis_lora_torch(x, bank.lora_a, bank.lora_b, bank.sigma,
                                                                          ids, bank.basis_of)
    if name == "multi_lora":
        lora_a, lora_b = bank.uncompressed()
        return lambda: lolakernels.multi_lora(x, lora_a, lora_b, ids, out=F.linear(x, bank.weight))
    layer = bank.peft_layer()
    names = [f"a{i}" for i in ids.tolist()]
    return lambda: layer(x.unsqueeze(1), adapter_names=names)


@pytest.mark.parametrize("method", ["base", "shared_basis_lora", "composition", "multi_lora", "peft"])
@pytest.mark.parametrize("cfg", CASES, ids=lambda c: f"{c.dtype}-R{c.rank}-T{c.tokens}-N{c.adapters}")
def test_layer(benchmark, cfg, method):
    benchmark.group = f"{cfg.dtype} R={cfg.rank} T={cfg.tokens} N={cfg.adapters}"
    fn = _method(method, cfg)
    with torch.no_grad():
        benchmark(fn)
