"""Timing and machine-limit helpers shared by every benchmark."""
from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch


def median_seconds(fn: Callable[[], object], *, min_runs: int = 5, min_seconds: float = 0.3, warmup: int = 2) -> float:
    """Median wall time of fn() after warm-up, over at least min_runs runs and min_seconds."""
    for _ in range(warmup):
        fn()
    samples = []
    started = time.perf_counter()
    while len(samples) < min_runs or time.perf_counter() - started < min_seconds:
        begin = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - begin)
        if len(samples) >= 200:
            break
    return statistics.median(samples)


def interleaved_seconds(fns: dict[str, Callable[[], object]], rounds: int = 3, **kwargs) -> dict[str, float]:
    """Best median of each fn over `rounds` interleaved rounds: on a shared, noisy machine this
    keeps drift in background load from favouring whichever method ran in a quiet moment."""
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best.get(name, float("inf")), median_seconds(fn, **kwargs))
    return best


def measure_read_bandwidth(num_bytes: int = 1 << 30) -> float:
    """Bytes/s of a streaming read (sum of a buffer far larger than the caches), on all threads."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    buffer = torch.ones(num_bytes // 4, dtype=torch.float32, device=device)
    seconds = median_seconds(buffer.sum, min_runs=5, min_seconds=0.5)
    del buffer
    return num_bytes / seconds


def machine_description() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def write_results(directory: Path, stem: str, payload: dict, markdown: str) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / f"{stem}.json"
    md_path = directory / f"{stem}.md"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    md_path.write_text(markdown)
    return json_path, md_path


def headless_pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or None when matplotlib is not
    installed (plots are optional; the JSON and markdown results are not)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt
