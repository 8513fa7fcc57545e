"""pytest-benchmark view of the serving benchmark (the CLI writes the full report):

    pytest benchmarks/bench_serving.py --benchmark-enable --benchmark-group-by=param:cfg

Each case generates a few tokens for one mixed batch on SmolLM2-135M-Instruct with PEFT's mixed
batch, with `lolakernels.peft.accelerate`, and with `attach_bank`. `lolakernels bench serving`
runs the issue's grid (1-256 adapters, fp32 and bf16) and writes JSON + markdown + PNG to
benchmarks/results/.
"""
import copy
import functools

import pytest
import torch

from lolakernels import models
from lolakernels.benchmarking.serving import Config, adapters_of, mixed_batch_generators, random_peft_model

CASES = [Config(dtype, n, 64, prompt_tokens=8, new_tokens=4) for dtype in ("float32", "bfloat16") for n in (1, 8, 64)]


@functools.lru_cache(maxsize=1)
def _setup(cfg: Config):
    import lolakernels
    from lolakernels.peft import attach_bank

    reason = models.smollm2_missing_reason()
    if reason is not None:
        pytest.skip(reason)
    dtype = getattr(torch, cfg.dtype)
    base = models.load_smollm2(dtype)
    peft_model = random_peft_model(copy.deepcopy(base), cfg.adapters, cfg.adapter_rank)
    names = [f"adapter{i}" for i in range(cfg.adapters)]
    bank = lolakernels.compress_adapters(adapters_of(peft_model, names), cfg.bank_rank, progress=False)
    served = attach_bank(base, bank)
    input_ids = torch.randint(0, base.config.vocab_size, (cfg.batch, cfg.prompt_tokens),
                              generator=torch.Generator().manual_seed(0))
    batch_names = [names[s % cfg.adapters] for s in range(cfg.batch)]
    return mixed_batch_generators(peft_model, served, bank, input_ids, batch_names, cfg.new_tokens)


@pytest.mark.parametrize("method", ["peft", "accelerate", "bank"])
@pytest.mark.parametrize("cfg", CASES, ids=lambda c: f"{c.dtype}-N{c.adapters}-B{c.batch}")
def test_mixed_batch_generation(benchmark, cfg, method):
    benchmark.group = f"{cfg.dtype} N={cfg.adapters} B={cfg.batch}"
    benchmark.pedantic(_setup(cfg)[method], rounds=3, warmup_rounds=1)
