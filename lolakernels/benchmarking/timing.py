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


def last_level_cache_bytes(default: int = 32 << 20) -> int:
    """Size of the CPU's largest cache level (sysfs), or `default` where sysfs does not say."""
    sizes = []
    for size_file in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = size_file.read_text().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * scale)
        except ValueError:
            continue
    return max(sizes, default=default)


def _cache_bytes(device: str) -> int:
    """The last-level cache a cold call must miss: the GPU's L2 on a GPU, else the CPU's."""
    if device == "cuda":
        return torch.cuda.get_device_properties(0).L2_cache_size
    return last_level_cache_bytes()


class CacheFlush:
    """Evicts the caches by reading a buffer three times the last-level cache (the GPU's L2 on a
    GPU), so that the next call finds its weights in memory, as every layer of a model does."""

    def __init__(self, device: str = "cpu"):
        self._buffer = torch.ones(3 * _cache_bytes(device) // 4, dtype=torch.float32, device=device)

    def __call__(self) -> None:
        self._buffer.sum()
        if self._buffer.is_cuda:
            torch.cuda.synchronize()


class StreamProbe:
    """A streaming read of a buffer four times the last-level cache (the GPU's L2 on a GPU), for
    timing among a benchmark's own cold calls: this machine's memory bandwidth drifts by up to 2x
    within minutes, so a fraction of the bandwidth is only meaningful against a read timed moments
    from the call it is compared with, not against one measurement at the start of the run."""

    def __init__(self, device: str = "cpu"):
        self._buffer = torch.ones(_cache_bytes(device), dtype=torch.float32, device=device)  # 4 bytes an element

    @property
    def num_bytes(self) -> int:
        return self._buffer.numel() * self._buffer.element_size()

    def __call__(self) -> None:
        self._buffer.sum()

    def bytes_per_second(self, seconds: float) -> float:
        return self.num_bytes / seconds


BASE = "__base__"  # the base's key in cold_paired_samples


def cold_paired_samples(base: Callable[[], object], fns: dict[str, Callable[[], object]], *, samples: int = 15,
                        flush: Callable[[], None] | None = None,
                        primes: dict[str, Callable[[], object]] | None = None) -> dict[str, list[float]]:
    """Cold-cache times of `base` (key BASE) and of each fn: {name: [seconds of sample i]}.

    Every call runs right after a cache flush, then (untimed) its entry in `primes`, keyed by the
    fn's name or "base": the same call on tiny stand-in data. In a model the interpreter, the
    dispatcher and the kernels' code stay in cache from layer to layer and only the weights come
    from memory; the flush evicts both, and the prime brings back the first without the second.
    Each sample times base and every fn once, in an order that rotates from sample to sample, so
    entry i of every list was timed within moments of the others: paired_summary takes what each
    fn adds within a sample. Samples of several calls of this (passes over a grid, minutes apart)
    can be concatenated and summarized together."""
    flush = flush or CacheFlush("cuda" if torch.cuda.is_available() else "cpu")
    primes = dict(primes or {})
    if "base" in primes:
        primes[BASE] = primes.pop("base")
    everything = {BASE: base, **fns}
    names = list(everything)
    for fn in everything.values():  # warm-up: allocations, first-call dispatch
        fn()
    times: dict[str, list[float]] = {name: [] for name in names}
    for sample in range(samples):
        for offset in range(len(names)):
            name = names[(sample + offset) % len(names)]
            flush()
            if name in primes:
                primes[name]()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            begin = time.perf_counter()
            everything[name]()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - begin)
    return times


def paired_summary(times: dict[str, list[float]]) -> tuple[float, dict[str, float], dict[str, float]]:
    """(median base seconds, {name: median seconds}, {name: median added seconds}) of
    cold_paired_samples' times: a fn's added time is the median over samples of (fn − base)
    within the sample. On a shared machine the base GEMM drifts by more than a small LoRA term
    costs, and pairing calls that ran moments apart cancels that drift."""
    base_times = times[BASE]
    fns = {name: values for name, values in times.items() if name != BASE}
    medians = {name: statistics.median(values) for name, values in fns.items()}
    added = {name: statistics.median(t - b for t, b in zip(values, base_times)) for name, values in fns.items()}
    return statistics.median(base_times), medians, added


def cold_paired_seconds(base: Callable[[], object], fns: dict[str, Callable[[], object]], *, samples: int = 15,
                        flush: Callable[[], None] | None = None,
                        primes: dict[str, Callable[[], object]] | None = None
                        ) -> tuple[float, dict[str, float], dict[str, float]]:
    """paired_summary of one cold_paired_samples run: (median base seconds, {name: median
    seconds}, {name: median added seconds})."""
    return paired_summary(cold_paired_samples(base, fns, samples=samples, flush=flush, primes=primes))


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
