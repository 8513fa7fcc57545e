"""AWSVD benchmark: time and weighted error of each route against the full-SVD route, in one run.

For each (shape, spectrum) it builds ``W`` and activation scales ``d``, runs the full-SVD route
(``awsvd(method="exact")``, what LoRAP does per matrix: the anchor), then for each rank the
randomized route (default tolerance, and tolerance 1e-3) and the Gram route, and reports
``speedup = t_exact / t_method`` and ``error ratio = ‖(W − L R) diag(d)‖_F / (the exact
route's error at that rank)``.

Spectra: ``power-law`` = random singular vectors with ``σ_i = i⁻¹``; ``gaussian`` = i.i.d.
N(0, 1/d_in) entries (a flat Marchenko–Pastur spectrum, the hardest case for range finders).
Activation scales: log-normal (σ = 0.5) with 1% of the channels ×10, like LLM outlier features.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

import lolakernels
from lolakernels.compress.weighted_svd import awsvd

from .timing import machine_description, median_seconds, write_results, headless_pyplot

# Issue targets: (largest rank, minimum speedup, maximum error ratio).
TARGETS = ((256, 10.0, 1.01), (1024, 2.0, 1.001))


@dataclass(frozen=True)
class Case:
    d_out: int
    d_in: int
    spectrum: str  # "power-law" or "gaussian"
    ranks: tuple[int, ...]


@dataclass(frozen=True)
class Method:
    name: str
    method: str
    tolerance: float = 1e-2


METHODS = (Method("randomized", "randomized"), Method("randomized tol 1e-3", "randomized", 1e-3),
           Method("gram", "gram"))


def full_grid() -> list[Case]:
    """The issue's grid: 4096×4096 and 4096×11008, ranks 64, 256, 1024, both spectra."""
    return [Case(d_out, d_in, spectrum, (64, 256, 1024))
            for d_out, d_in in ((4096, 4096), (4096, 11008)) for spectrum in ("power-law", "gaussian")]


def quick_grid() -> list[Case]:
    return [Case(1024, 1024, spectrum, (16, 64, 256)) for spectrum in ("power-law", "gaussian")]


def make_problem(case: Case, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W [d_out, d_in], d [d_in])`` in float32 for one case."""
    generator = torch.Generator().manual_seed(seed)
    d_out, d_in = case.d_out, case.d_in
    if case.spectrum == "power-law":
        k = min(d_out, d_in)
        u = torch.linalg.qr(torch.randn(d_out, k, generator=generator)).Q
        v = torch.linalg.qr(torch.randn(d_in, k, generator=generator)).Q
        singular_values = torch.arange(1, k + 1, dtype=torch.float32).reciprocal()
        weight = (u * singular_values) @ v.T
    elif case.spectrum == "gaussian":
        weight = torch.randn(d_out, d_in, generator=generator) / math.sqrt(d_in)
    else:
        raise ValueError(f"unknown spectrum {case.spectrum!r}")
    scale = torch.exp(0.5 * torch.randn(d_in, generator=generator))
    scale[torch.randperm(d_in, generator=generator)[: max(1, d_in // 100)]] *= 10
    return weight.contiguous(), scale


def weighted_error(weight: torch.Tensor, scale: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> float:
    """``‖(W − L R) diag(d)‖_F``: the product in float32 (its rounding is ~10⁻⁷ of W), the
    residual and its norm in float64."""
    residual = (weight.double() - (left.float() @ right.float()).double()) * scale.double()
    return float(torch.linalg.matrix_norm(residual))


def _meets(rank: int, speedup: float, ratio: float) -> Optional[bool]:
    for largest, min_speedup, max_ratio in TARGETS:
        if rank <= largest:
            return speedup >= min_speedup and ratio <= max_ratio
    return None


# A call slower than this is timed once: its own first-call overheads are negligible, and
# repeating multi-second factorizations would make the grid take hours on a 2-core CPU.
SINGLE_RUN_SECONDS = 2.0


def _seconds(fn) -> float:
    """One timed call if it is slow, else the median of 3 more after it (as warm-up)."""
    begin = time.perf_counter()
    fn()
    first = time.perf_counter() - begin
    if first >= SINGLE_RUN_SECONDS:
        return first
    return median_seconds(fn, min_runs=3, min_seconds=0.0, warmup=0)


def run_case(case: Case, progress: bool = True) -> list[dict]:
    weight, scale = make_problem(case)
    exact_factors = {}

    def exact():
        exact_factors["factors"] = awsvd(weight, scale, max(case.ranks), method="exact")

    exact_seconds = _seconds(exact)
    exact_left, exact_right = exact_factors["factors"]
    rows = []
    for rank in case.ranks:
        # The full-SVD factors are ordered by singular value: their leading k columns/rows are
        # the optimal rank-k factors.
        optimal = weighted_error(weight, scale, exact_left[:, :rank], exact_right[:rank])
        for method in METHODS:
            def call(rank=rank, method=method):
                return awsvd(weight, scale, rank, method=method.method, tolerance=method.tolerance)

            seconds = _seconds(call)
            ratio = weighted_error(weight, scale, *call()) / optimal
            speedup = exact_seconds / seconds
            row = {**asdict(case), "rank": rank, "method": method.name, "tolerance": method.tolerance,
                   "seconds": seconds, "exact_seconds": exact_seconds, "speedup_vs_exact": speedup,
                   "error_ratio": ratio, "meets_target": _meets(rank, speedup, ratio)}
            row.pop("ranks")
            rows.append(row)
            if progress:
                print(f"{case.d_out}×{case.d_in} {case.spectrum:>9} k={rank:<5} {method.name:<20} "
                      f"{seconds:7.3f} s  {speedup:6.1f}× vs full SVD ({exact_seconds:.2f} s)  "
                      f"error {ratio:.5f}× optimal", flush=True)
    return rows


def markdown_table(rows: list[dict], machine: str) -> str:
    lines = [
        f"# awsvd on {machine}",
        "",
        "Anchor: the full-SVD route (`awsvd(method=\"exact\")`, what LoRAP runs per matrix), timed in the same run.",
        "Error ratio = ‖(W − L R) diag(d)‖_F / the full-SVD route's error at the same rank (1 = optimal).",
        "Targets: rank ≤ 256: ≥ 10× faster with error ≤ 1.01×; rank 1024: ≥ 2× faster with error ≤ 1.001×.",
        "`auto` runs `randomized` (default tolerance) at every rank here",
        "(rank ≤ 0.4 · min(d_out, d_in) from 2048 up).",
        "",
        "| d_out×d_in | spectrum | rank | method | time s | full SVD s | speedup | error ratio | target met |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        met = {True: "yes", False: "no", None: "–"}[r["meets_target"]]
        lines.append(f"| {r['d_out']}×{r['d_in']} | {r['spectrum']} | {r['rank']} | {r['method']} "
                     f"| {r['seconds']:.3f} | {r['exact_seconds']:.2f} | {r['speedup_vs_exact']:.1f}× "
                     f"| {r['error_ratio']:.5f} | {met} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> Optional[Path]:
    """Speedup over the full-SVD route (left) and error ratio (right) against rank."""
    plt = headless_pyplot()
    if plt is None:
        return None
    figure, (speed_axis, error_axis) = plt.subplots(1, 2, figsize=(11, 4))
    keys = sorted({(r["d_out"], r["d_in"], r["spectrum"], r["method"]) for r in rows})
    for d_out, d_in, spectrum, method in keys:
        points = sorted((r["rank"], r["speedup_vs_exact"], r["error_ratio"]) for r in rows
                        if (r["d_out"], r["d_in"], r["spectrum"], r["method"]) == (d_out, d_in, spectrum, method))
        ranks, speedups, ratios = zip(*points)
        style = "-" if spectrum == "power-law" else "--"
        label = f"{method}, {d_out}×{d_in}, {spectrum}"
        speed_axis.plot(ranks, speedups, style, marker="o", label=label)
        error_axis.plot(ranks, [ratio - 1 for ratio in ratios], style, marker="o", label=label)
    for axis in (speed_axis, error_axis):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("rank")
        axis.grid(True, alpha=0.3)
    speed_axis.set_yscale("log")
    speed_axis.set_ylabel("speedup over the full-SVD route")
    error_axis.set_yscale("log")
    error_axis.set_ylabel("error ratio − 1")
    error_axis.axhline(0.01, color="gray", lw=0.8)
    error_axis.axhline(0.001, color="gray", lw=0.8, ls=":")
    speed_axis.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def run(cases: list[Case], out_dir: Optional[Path], *, stem: str = "awsvd_cpu",
        progress: bool = True) -> tuple[list[dict], str]:
    """Runs every case; writes <stem>.json/.md/.png under out_dir; returns (rows, markdown)."""
    machine = machine_description()
    started = time.perf_counter()
    rows: list[dict] = []
    for index, case in enumerate(cases):
        rows += run_case(case, progress)
        table = markdown_table(rows, machine)
        if out_dir is not None:
            # Written after every case: the full grid takes long enough to be worth keeping in part.
            payload = {"machine": machine, "torch": torch.__version__, "lolakernels": lolakernels.__version__,
                       "seconds": time.perf_counter() - started, "complete": index == len(cases) - 1,
                       "rows": rows}
            write_results(out_dir, stem, payload, table)
    if out_dir is not None:
        plot(rows, out_dir / f"{stem}.png")
    return rows, table
