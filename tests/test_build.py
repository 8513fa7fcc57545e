"""What was built and what `lolakernels info` reports."""
import importlib
import os
import subprocess
import sys

import pytest

import lolakernels


def test_info_reports_versions_backends_and_cpu():
    report = lolakernels.info(print_report=False)
    assert report["extensions"]["_C"] == "built"
    assert report["backends"]["cpu"] == "available" and report["backends"]["reference"] == "available"
    assert set(report["backends"]) == {"cuda", "triton", "cpu", "reference"}
    assert report["cpu_isa"] in ("scalar", "avx512", "avx512_bf16")
    for name in ("torch", "triton", "peft", "transformers", "bitsandbytes"):
        assert name in report


def test_info_command_runs():
    result = subprocess.run([sys.executable, "-m", "lolakernels.cli", "info"], capture_output=True, text=True,
                            check=True)
    assert "backends:" in result.stdout and "cpu_isa" in result.stdout


@pytest.mark.skipif(os.environ.get("LOLA_BUILD_CUDA") != "1", reason="only checked when LOLA_BUILD_CUDA=1 (as CI sets)")
def test_cuda_extension_compiled_for_ampere_and_hopper():
    cuda_module = importlib.import_module("lolakernels._cuda")
    archs = cuda_module.compiled_archs()
    assert "sm_80" in archs and "sm_90" in archs, archs
    assert cuda_module.decode_max_tokens == 64
