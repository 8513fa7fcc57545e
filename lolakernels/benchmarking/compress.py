"""Speed of joint compression: ``compress_adapters`` on N synthetic PEFT adapters of one slot.

The issue's case: N = 1000 adapters of rank r = 16 on one 4096 × 4096 slot, JD-Full and JD-Diag
at R = 16 and 64, with the library defaults (``max_iters=100``, ``tol=1e-6``, unit weighting).
Each configuration runs in a fresh process, so its peak resident memory is its own; a sampling
thread records the peak RSS while ``compress_adapters`` runs, and the report gives it next to
the RSS before the call (the adapters themselves) and the O((d_in + d_out)·(N·r + R)) floor of
the factored representation.

Synthetic collection: adapters that partly share a subspace, as fine-tunes of one base model tend
to, ``B_i = U₀ D G_i + ε N_i``, ``A_i = H_i D V₀ᵀ + ε N_i'`` with ``U₀ [d_out, 64]``, ``V₀ [d_in, 64]``
orthonormal, ``D = diag(0.93^k)`` (a decaying shared spectrum) and Gaussian ``G_i, H_i, N_i, N_i'``;
ε = 0.5·‖D‖_F / sqrt(d) gives each factor a private part of a quarter of its shared energy.
"""
from __future__ import annotations

import math
import multiprocessing
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

SHARED_RANK = 64
SHARED_DECAY = 0.93
PRIVATE_SCALE = 0.5


@dataclass(frozen=True)
class Config:
    method: str
    rank: int
    adapters: int = 1000
    lora_rank: int = 16
    d_in: int = 4096
    d_out: int = 4096


def full_grid() -> list[Config]:
    return [Config(method, rank) for method in ("jd-full", "jd-diag") for rank in (16, 64)]


def quick_grid() -> list[Config]:
    return [Config(method, 16, adapters=200, d_in=1024, d_out=1024) for method in ("jd-full", "jd-diag")]


SLOT = "model.layers.0.self_attn.q_proj"


def synthetic_collection(cfg: Config, seed: int = 0) -> dict:
    """name -> (LoraConfig dict, state dict) of ``cfg.adapters`` adapters on one slot (module doc)."""
    generator = torch.Generator().manual_seed(seed)
    r, n = cfg.lora_rank, cfg.adapters
    shared_left, _ = torch.linalg.qr(torch.randn(cfg.d_out, SHARED_RANK, generator=generator))
    shared_right, _ = torch.linalg.qr(torch.randn(cfg.d_in, SHARED_RANK, generator=generator))
    # One GEMM per side for all adapters: per-adapter ops would dominate the set-up time.
    decay = SHARED_DECAY ** torch.arange(SHARED_RANK, dtype=torch.float32)
    lora_b = shared_left @ (decay[:, None] * torch.randn(SHARED_RANK, n * r, generator=generator))
    # Private noise of PRIVATE_SCALE² times the shared energy per factor column.
    private = PRIVATE_SCALE * float(decay.norm())
    lora_b += private / math.sqrt(cfg.d_out) * torch.randn(cfg.d_out, n * r, generator=generator)
    lora_b = lora_b.reshape(cfg.d_out, n, r).permute(1, 0, 2).contiguous()
    lora_a = (torch.randn(n * r, SHARED_RANK, generator=generator) * decay) @ shared_right.T
    lora_a += private / math.sqrt(cfg.d_in) * torch.randn(n * r, cfg.d_in, generator=generator)
    lora_a = lora_a.reshape(n, r, cfg.d_in)
    config = {"r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj"], "base_model_name_or_path": "synthetic"}
    return {f"adapter{i:04d}": (config, {f"base_model.model.{SLOT}.lora_A.weight": lora_a[i],
                                         f"base_model.model.{SLOT}.lora_B.weight": lora_b[i]}) for i in range(n)}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRss:
    """Samples the resident set size every few milliseconds while active."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self._stop = interval, _rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def run_config(cfg: Config) -> dict:
    """Builds the collection, then times one ``compress_adapters`` call with the defaults."""
    import peft  # noqa: F401  (imported before measuring: its import is not compression memory)

    from ..compress.joint import compress_adapters

    adapters = synthetic_collection(cfg)
    rss_before = _rss_bytes()
    with _PeakRss() as peak:
        started, cpu_started = time.perf_counter(), time.process_time()
        bank = compress_adapters(adapters, cfg.rank, method=cfg.method, progress=False)
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    log = bank.fit_log["slots"][SLOT]
    row = asdict(cfg)
    row.update(
        seconds=seconds,
        cpu_seconds=cpu_seconds,
        load_average=os.getloadavg()[0],
        sweeps=log["sweeps"][0],
        final_weighted_loss=log["loss"][0][-1],
        mean_relative_error=bank.reconstruction_error().mean(),
        rss_before_gb=rss_before / 1e9,
        peak_rss_gb=peak.peak / 1e9,
        working_memory_gb=(peak.peak - rss_before) / 1e9,
        factor_floor_gb=4 * (cfg.d_in + cfg.d_out) * (cfg.adapters * cfg.lora_rank + cfg.rank) / 1e9,
        threads=torch.get_num_threads(),
    )
    return row


def _child(cfg: Config, queue) -> None:
    try:
        queue.put(run_config(cfg))
    except BaseException as error:  # report, so the parent does not wait forever
        queue.put({"error": repr(error)})


def run_isolated(cfg: Config) -> dict:
    """``run_config`` in a fresh (spawned) process: its own peak memory and allocator state."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(cfg, queue))
    process.start()
    row = queue.get()
    process.join()
    if "error" in row:
        raise RuntimeError(f"{cfg}: {row['error']}")
    return row


def markdown_table(rows: list[dict], machine: str) -> str:
    lines = [
        f"# compress_adapters speed on {machine}",
        "",
        "One `compress_adapters` call per row (reading the adapters, factoring, fitting, errors), library",
        "defaults (`max_iters=100`, `tol=1e-6`, unit weighting), each in a fresh process. Synthetic adapters",
        f"sharing a {SHARED_RANK}-dimensional subspace (decaying spectrum) plus a private part",
        "(see lolakernels/benchmarking/compress.py).",
        "Working memory = peak RSS during the call − RSS before it (the adapters); floor = the factored",
        "adapters, 4·(d_in + d_out)·(N·r + R) bytes. CPU time is the process's user + system time (all",
        "threads); the load average (1 min, at the end of the call) shows how busy the machine was.",
        "",
        "| method | R | N | r | d_out × d_in | time (s) | CPU time (s) | load | sweeps | weighted loss "
        "| mean rel. error | peak RSS (GB) | working memory (GB) | floor (GB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['rank']} | {r['adapters']} | {r['lora_rank']} | {r['d_out']} × {r['d_in']} "
            f"| {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['load_average']:.1f} | {r['sweeps']} "
            f"| {r['final_weighted_loss']:.4f} | {r['mean_relative_error']:.4f} "
            f"| {r['peak_rss_gb']:.2f} | {r['working_memory_gb']:.2f} | {r['factor_floor_gb']:.2f} |")
    return "\n".join(lines) + "\n"


def run(configs: list[Config], out_dir: Optional[Path], *, stem: str = "compress_speed_cpu",
        progress: bool = True) -> tuple[list[dict], str]:
    """Runs every config (each in its own process); writes <stem>.json/.md; returns (rows, markdown)."""
    import lolakernels

    from .timing import machine_description, write_results

    machine = machine_description()
    rows = []
    for index, cfg in enumerate(configs):
        row = run_isolated(cfg)
        rows.append(row)
        if progress:
            print(f"[{index + 1}/{len(configs)}] {cfg.method} R={cfg.rank} N={cfg.adapters} d={cfg.d_out}x{cfg.d_in}: "
                  f"{row['seconds']:.1f} s, {row['sweeps']} sweeps, peak RSS {row['peak_rss_gb']:.2f} GB", flush=True)
    table = markdown_table(rows, machine)
    if out_dir is not None:
        payload = {"machine": machine, "torch": torch.__version__, "lolakernels": lolakernels.__version__,
                   "rows": rows}
        write_results(out_dir, stem, payload, table)
    return rows, table
