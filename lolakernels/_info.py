"""`lolakernels.info()` / `lolakernels info`: what was built, what can run here and why not."""
from __future__ import annotations

import importlib
import platform
from importlib import metadata

import torch

from . import _backends


def _version(package: str) -> str:
    # Read the installed metadata rather than importing: bitsandbytes/transformers are slow to load.
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def collect() -> dict:
    """Everything `info` prints, as a dict."""
    from . import __version__

    built = {}
    for module in ("_C", "_cuda"):
        try:
            importlib.import_module(f"lolakernels.{module}")
            built[module] = "built"
        except ImportError as error:
            built[module] = f"not built ({error})"
    cpu_features, cpu_isa = {}, "unknown"
    try:
        from . import _C, cpu

        cpu_features = dict(_C.cpu_features())
        cpu_isa = _C.isa_name(cpu.isa())
    except ImportError:
        pass
    gpu = "none"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
    return {
        "lolakernels": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "peft": _version("peft"),
        "transformers": _version("transformers"),
        "bitsandbytes": _version("bitsandbytes"),
        "extensions": built,
        "backends": _backends.report(),
        "forced_backend": _backends.forced_backend() or "none (LOLA_BACKEND unset)",
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_isa": cpu_isa,
        "cpu_features": cpu_features,
        "gpu": gpu,
    }


def info(print_report: bool = True) -> dict:
    """Prints (and returns) versions, built extensions, backends usable here, CPU features, GPU."""
    report = collect()
    if print_report:
        for key, value in report.items():
            if isinstance(value, dict):
                print(f"{key}:")
                for sub_key, sub_value in value.items():
                    print(f"  {sub_key:<14} {sub_value}")
            else:
                print(f"{key:<16} {value}")
    return report
