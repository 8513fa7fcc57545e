import os

import pytest
import torch


def _cpu_isas():
    from lolakernels import _C

    best = _C.best_isa()
    return [name for name, code in (("scalar", _C.ISA_SCALAR), ("avx512", _C.ISA_AVX512),
                                    ("avx512_bf16", _C.ISA_AVX512_BF16)) if code <= best]


# (backend, cpu isa) pairs that run on this machine's CPU tensors.
CPU_BACKENDS = [("reference", None)] + [("cpu", isa) for isa in _cpu_isas()]


@pytest.fixture
def use_backend(monkeypatch):
    """Forces a backend (and a CPU instruction set) for the duration of one test."""

    def force(backend: str, isa: str | None = None) -> None:
        monkeypatch.setenv("LOLA_BACKEND", backend)
        if isa is None:
            monkeypatch.delenv("LOLA_CPU_ISA", raising=False)
        else:
            monkeypatch.setenv("LOLA_CPU_ISA", isa)

    return force


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct in fp32, loaded once per session. Tests must not modify it in place:
    wrap a ``copy.deepcopy`` of it."""
    from lolakernels import models

    reason = models.smollm2_missing_reason()
    if reason is not None:
        pytest.skip(reason)
    return models.load_smollm2(torch.float32)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from lolakernels import models

    reason = models.smollm2_missing_reason()
    if reason is not None:
        pytest.skip(reason)
    return models.load_smollm2_tokenizer()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is visible on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


os.environ.pop("LOLA_BACKEND", None)
