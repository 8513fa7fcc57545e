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


def test_subpackages_are_attributes_of_the_package_and_load_lazily():
    """`import lolakernels` alone gives lolakernels.peft, .compress, .merge, .serving (as the README
    uses them) without importing peft or transformers up front."""
    code = ("import sys, lolakernels\n"
            "assert 'peft' not in sys.modules and 'transformers' not in sys.modules\n"
            "assert callable(lolakernels.peft.attach_bank) and callable(lolakernels.compress.lorap)\n"
            "assert callable(lolakernels.merge.svd_merge) and callable(lolakernels.serving.add_lora)\n"
            "assert 'serving' in dir(lolakernels)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_module_runs_as_the_command():
    result = subprocess.run([sys.executable, "-m", "lolakernels", "info"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "backends" in result.stdout.lower()
