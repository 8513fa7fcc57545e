"""Shared-basis LoRA benchmark: what one adapted linear layer costs on top of its base GEMM.

For each (dtype, clusters C, rank R, tokens T, adapters N) it times, in the same run:
  base         y = x · Wᵀ
  shared       base + lolakernels.shared_basis_lora (JD-Full Σ, C bases)
  composition  base + the plain-PyTorch composition (two GEMMs + gather of Σ)
  multi_lora   base + lolakernels.multi_lora on the equivalent uncompressed adapters (rank R)
  peft         PEFT's mixed-batch forward (adapter_names=) on those adapters, PEFT's defaults
each right after a cache flush, as every layer of a model finds its weights in memory, and
reports the time each adds over the base GEMM (paired within a sample, see
timing.paired_summary), speed ratios of those added times, and the fraction of the memory
bandwidth the shared_basis_lora call alone reaches, against a streaming read timed among the
row's own samples (timing.StreamProbe), with the time the row's LoRA bytes take at that bandwidth
as a share of the base GEMM: the least the call can add on this machine at that moment. The warm
figure (the call repeated on its own, bank in cache) is kept beside it for comparison with earlier
reports. With passes > 1 the grid is run that many times over and each row pools its samples of
every pass, minutes apart.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

import lolakernels
from lolakernels.reference import shared_basis_lora_torch

from .timing import (CacheFlush, StreamProbe, cold_paired_samples, headless_pyplot, interleaved_seconds,
                     machine_description, paired_summary, write_results)


@dataclass(frozen=True)
class Config:
    dtype: str
    clusters: int
    rank: int
    tokens: int
    adapters: int
    d_in: int = 4096
    d_out: int = 4096


def full_grid(d: int = 4096) -> list[Config]:
    """The grid of the issue: R ∈ {16, 64}, T ∈ {1, 16, 256}, N ∈ {1, 64, 1024}, C ∈ {1, 8},
    fp32 and bf16; plus N = T = 64 and N = T = 256 for the PEFT comparison."""
    grid = [Config(dtype, clusters, rank, tokens, adapters, d, d)
            for dtype, clusters, rank, tokens, adapters in itertools.product(
                ("float32", "bfloat16"), (1, 8), (16, 64), (1, 16, 256), (1, 64, 1024))
            if adapters >= clusters]
    grid += [Config(dtype, 1, rank, n, n, d, d) for dtype in ("float32", "bfloat16") for rank in (16, 64)
             for n in (64, 256)]
    return grid


def decode_grid(d: int = 4096) -> list[Config]:
    """As many adapters as tokens (N = T ∈ {16, 64, 256}, ids drawn at random), C = 1: the multi-LoRA
    decode shapes."""
    return [Config(dtype, 1, rank, n, n, d, d) for dtype in ("float32", "bfloat16") for rank in (16, 64)
            for n in (16, 64, 256)]


def quick_grid(d: int = 1024) -> list[Config]:
    return [Config(dtype, 1, 16, tokens, adapters, d, d)
            for dtype in ("float32", "bfloat16") for tokens, adapters in ((1, 8), (16, 64), (64, 64))]


class _Adapters:
    """A shared-basis bank and its equivalent uncompressed adapters for one (dtype, C, R, N)."""

    def __init__(self, cfg: Config, seed: int = 0):
        dtype = getattr(torch, cfg.dtype)
        generator = torch.Generator().manual_seed(seed)
        randn = lambda *shape, std: (torch.randn(*shape, generator=generator) * std)  # noqa: E731
        self.weight = randn(cfg.d_out, cfg.d_in, std=cfg.d_in ** -0.5).to(dtype)
        self.lora_a = randn(cfg.clusters, cfg.rank, cfg.d_in, std=cfg.d_in ** -0.5).to(dtype)
        self.lora_b = randn(cfg.clusters, cfg.d_out, cfg.rank, std=cfg.rank ** -0.5).to(dtype)
        self.sigma = randn(cfg.adapters, cfg.rank, cfg.rank, std=cfg.rank ** -0.5).to(dtype)
        self.basis_of = torch.arange(cfg.adapters, dtype=torch.int32) % cfg.clusters
        self._uncompressed: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._peft = None
        self.cfg = cfg

    def uncompressed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """lora_a [N, R, d_in] = A_c, lora_b [N, d_out, R] = B_c Σ_i: the same deltas, stored per adapter."""
        if self._uncompressed is None:
            cluster = self.basis_of.long()
            lora_a = self.lora_a[cluster].contiguous()
            lora_b = torch.bmm(self.lora_b[cluster].float(), self.sigma.float()).to(self.lora_a.dtype)
            self._uncompressed = (lora_a, lora_b)
        return self._uncompressed

    def peft_layer(self):
        """A peft.tuners.lora.Linear holding the N uncompressed adapters (PEFT keeps them in fp32)."""
        if self._peft is None:
            import peft

            cfg = self.cfg
            base = torch.nn.Linear(cfg.d_in, cfg.d_out, bias=False, dtype=self.weight.dtype)
            base.weight.data.copy_(self.weight)
            model = torch.nn.Sequential()
            model.add_module("proj", base)
            config = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, target_modules=["proj"])
            peft_model = peft.get_peft_model(model, config, adapter_name="a0")
            layer = peft_model.base_model.model.proj
            for i in range(1, cfg.adapters):
                layer.update_layer(f"a{i}", cfg.rank, cfg.rank, config=config)
                # PeftModel.add_adapter's default (autocast_adapter_dtype=True) keeps fp16/bf16
                # adapters in fp32, as get_peft_model did for a0; update_layer alone does not.
                layer.lora_A[f"a{i}"].float()
                layer.lora_B[f"a{i}"].float()
            lora_a, lora_b = self.uncompressed()
            with torch.no_grad():
                for i in range(cfg.adapters):
                    layer.lora_A[f"a{i}"].weight.copy_(lora_a[i])
                    layer.lora_B[f"a{i}"].weight.copy_(lora_b[i])
            self._peft = layer.eval()
        return self._peft


def _lora_bytes(cfg: Config, ids: torch.Tensor, basis_of: torch.Tensor, element_size: int) -> int:
    """docs/design.md §7: C_active·R(d_in+d_out) + N_active·R² weights, plus x and two passes over out."""
    active = ids[ids >= 0].unique()
    clusters_active = basis_of[active.long()].unique().numel()
    weights = clusters_active * cfg.rank * (cfg.d_in + cfg.d_out) + active.numel() * cfg.rank ** 2
    activations = ids.numel() * (cfg.d_in + 2 * cfg.d_out)
    return (weights + activations) * element_size


def _twin(cfg: Config) -> Config:
    """The same batch (C, R, N, T, ids) on a 64 × 64 layer: the cache prime of every timed call."""
    return Config(cfg.dtype, cfg.clusters, cfg.rank, cfg.tokens, cfg.adapters, 64, 64)


def _layer_methods(cfg: Config, a: _Adapters, with_peft: bool) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """{name: callable} for base, every layer variant and the shared_basis_lora call alone, on
    inputs drawn from the config's own seed; returns them with x and ids."""
    dtype = getattr(torch, cfg.dtype)
    generator = torch.Generator().manual_seed(cfg.tokens * 7919 + cfg.adapters)
    x = torch.randn(cfg.tokens, cfg.d_in, generator=generator).to(dtype)
    ids = torch.randint(0, cfg.adapters, (cfg.tokens,), generator=generator, dtype=torch.int32)
    methods = {
        "base": lambda: F.linear(x, a.weight),
        "shared": lambda: lolakernels.shared_basis_lora(x, a.lora_a, a.lora_b, a.sigma, ids, basis_of=a.basis_of,
                                                        out=F.linear(x, a.weight), validate=False),
        "shared_lora_only": lambda: lolakernels.shared_basis_lora(x, a.lora_a, a.lora_b, a.sigma, ids,
                                                                  basis_of=a.basis_of, validate=False),
        "composition": lambda: F.linear(x, a.weight) + shared_basis_lora_torch(x, a.lora_a, a.lora_b, a.sigma, ids,
                                                                              a.basis_of),
    }
    # multi_lora and PEFT run on uncompressed adapters, which do not depend on C: measured at C = 1.
    if cfg.clusters == 1:
        lora_a_flat, lora_b_flat = a.uncompressed()
        methods["multi_lora"] = lambda: lolakernels.multi_lora(x, lora_a_flat, lora_b_flat, ids,
                                                               out=F.linear(x, a.weight), validate=False)
        if with_peft:
            layer, names, x3 = a.peft_layer(), [f"a{i}" for i in ids.tolist()], x.unsqueeze(1)
            methods["peft"] = lambda: layer(x3, adapter_names=names)
    return methods, x, ids


def measure_config(cfg: Config, adapters: _Adapters, probe: StreamProbe, with_peft: bool,
                   flush: Optional[CacheFlush] = None, samples: int = 15, twin: Optional[_Adapters] = None) -> dict:
    """One pass over a config: the errors against PEFT, the warm times and the raw cold samples
    (timing.cold_paired_samples, the stream probe among them), for row_of."""
    methods, x, ids = _layer_methods(cfg, adapters, with_peft)
    primes = _layer_methods(_twin(cfg), twin, with_peft)[0] if twin is not None else None
    layers = {name: fn for name, fn in methods.items() if name not in ("base", "shared_lora_only")}
    errors = {}
    with torch.no_grad():
        if "peft" in methods:
            reference = methods["peft"]().squeeze(1).float()
            scale = reference.abs().max().item()
            for name in ("multi_lora", "shared"):
                error = (methods[name]().float() - reference).abs().max().item()
                errors[f"max_rel_error_{name}_vs_peft"] = error / scale
        warm = interleaved_seconds({"base": methods["base"], "shared_lora_only": methods["shared_lora_only"]})
        cold = cold_paired_samples(
            methods["base"], {**layers, "shared_lora_only": methods["shared_lora_only"], "stream": probe},
            samples=samples, flush=flush, primes=primes)
    return {"errors": errors, "warm": warm, "cold": cold, "layers": list(layers),
            "lora_bytes": _lora_bytes(cfg, ids, adapters.basis_of, x.element_size())}


def row_of(cfg: Config, passes: list[dict], probe: StreamProbe) -> dict:
    """The report row of a config from its passes (measure_config): every median is taken over the
    samples of all passes together, so a row measured in passes minutes apart is not the verdict
    of one phase of this machine's drifting memory; shared_added_pct_by_pass keeps each pass's own."""
    row = asdict(cfg)
    row.update(passes[0]["errors"])
    cold = {name: [t for one in passes for t in one["cold"][name]] for name in passes[0]["cold"]}
    base_cold, medians, added = paired_summary(cold)
    bandwidth = probe.bytes_per_second(medians.pop("stream"))
    added.pop("stream")
    layers = passes[0]["layers"]
    row["passes"] = len(passes)
    row["base_ms"] = min(one["warm"]["base"] for one in passes) * 1e3
    row["shared_lora_only_ms"] = min(one["warm"]["shared_lora_only"] for one in passes) * 1e3
    row["base_cold_ms"] = base_cold * 1e3
    row["shared_lora_only_cold_ms"] = medians["shared_lora_only"] * 1e3
    for name in layers:
        row[f"{name}_cold_ms"] = medians[name] * 1e3
        row[f"{name}_added_ms"] = added[name] * 1e3
        row[f"{name}_added_pct"] = 100 * added[name] / base_cold
    if len(passes) > 1:
        by_pass = [paired_summary(one["cold"]) for one in passes]
        row["shared_added_pct_by_pass"] = [100 * one_added["shared"] / one_base for one_base, _, one_added in by_pass]
    # Ratios of added times; when noise leaves either one non-positive the ratio means nothing.
    ratio = lambda slow, fast: slow / fast if slow > 0 and fast > 0 else None  # noqa: E731
    row["shared_speedup_vs_composition"] = ratio(added["composition"], added["shared"])
    if "peft" in added:
        row["multi_lora_added_time_speedup_vs_peft"] = ratio(added["peft"], added["multi_lora"])
        row["shared_added_time_speedup_vs_peft"] = ratio(added["peft"], added["shared"])
    row["lora_bytes"] = passes[0]["lora_bytes"]
    row["read_bandwidth_bytes_per_s"] = bandwidth
    row["lora_fraction_of_bandwidth"] = row["lora_bytes"] / medians["shared_lora_only"] / bandwidth
    row["lora_bytes_floor_pct"] = 100 * row["lora_bytes"] / bandwidth / base_cold
    return row


def _fmt(value, digits=1):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def _ratio(value):
    return "–" if value is None else f"{value:.2f}×"


def _pct(value) -> str:
    return "–" if value is None else f"{value:+.1f}%"


def _shared_added(row: dict) -> str:
    """The call's added time, with the range over passes where the row has several."""
    by_pass = row.get("shared_added_pct_by_pass")
    text = _pct(row["shared_added_pct"])
    return text if not by_pass else f"{text} ({min(by_pass):+.1f} to {max(by_pass):+.1f})"


def markdown_table(rows: list[dict], machine: str) -> str:
    shapes = ", ".join(sorted({f"{r['d_in']} × {r['d_out']}" for r in rows}))
    lines = [
        f"# shared-basis LoRA on {machine}",
        "",
        f"d_in × d_out = {shapes}, JD-Full Σ.",
        "Every call runs right after a cache flush, as a layer of a model finds its weights in memory.",
        "'+ X' is the time X adds over the base GEMM: the median over samples of (layer − base GEMM) timed",
        "moments apart, over the median cold base GEMM. 'alone, warm' is the shared_basis_lora call repeated",
        "on its own with the bank in cache (the figure earlier reports gave). Ratios compare added times.",
        "PEFT runs its own defaults; multi_lora and PEFT hold uncompressed adapters, so they run at C = 1.",
        "'GB/s' is a streaming read timed among the row's own samples (the bandwidth of this machine drifts",
        "by up to 2x within minutes); 'bytes floor' is the time the row's LoRA bytes (docs/design.md §7) take at",
        "that bandwidth, over the base GEMM: the least shared_basis_lora can add here and now.",
        "With several passes over the grid (minutes apart) a row's medians pool the samples of every pass,",
        "and the range after '+ shared_basis_lora' is that of the passes' own medians.",
        "",
        "| dtype | C | R | T | N | base ms (cold) | + shared_basis_lora | alone, warm | + composition "
        "| + multi_lora | + PEFT | shared vs composition | multi_lora vs PEFT | shared vs PEFT "
        "| shared alone (cold), % of bandwidth | GB/s | bytes floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dtype']} | {r['clusters']} | {r['rank']} | {r['tokens']} | {r['adapters']} "
            f"| {_fmt(r['base_cold_ms'], 2)} | {_shared_added(r)} "
            f"| {_fmt(100 * r['shared_lora_only_ms'] / r['base_ms'])}% | {_pct(r['composition_added_pct'])} "
            f"| {_pct(r.get('multi_lora_added_pct'))} | {_pct(r.get('peft_added_pct'))} "
            f"| {_ratio(r.get('shared_speedup_vs_composition'))} "
            f"| {_ratio(r.get('multi_lora_added_time_speedup_vs_peft'))} "
            f"| {_ratio(r.get('shared_added_time_speedup_vs_peft'))} | {_fmt(100 * r['lora_fraction_of_bandwidth'])} "
            f"| {_fmt(r['read_bandwidth_bytes_per_s'] / 1e9)} | {_pct(r['lora_bytes_floor_pct'])} |"
        )
    return "\n".join(lines) + "\n"


def summary_table(payload: dict, decode: bool = False) -> str:
    """The README's condensed table: T ∈ {16, 256} × N ∈ {64, 1024} plus N = T = 64 (or, with
    decode, every row of a decode_grid run)."""
    rows = [r for r in payload["rows"] if decode or (r["tokens"] in (16, 256) and r["adapters"] in (64, 1024))
            or r["tokens"] == r["adapters"] == 64]
    rows.sort(key=lambda r: (r["dtype"] != "float32", r["clusters"], r["rank"], r["tokens"], r["adapters"]))
    lines = [
        "| dtype | C | R | T | N | base GEMM (cold) | + shared_basis_lora | bytes floor | + composition "
        "| + multi_lora | + PEFT mixed batch | multi_lora vs PEFT |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        # Runs written before the per-row bandwidth probe have no floor.
        floor = r.get("lora_bytes_floor_pct")
        lines.append(
            f"| {r['dtype']} | {r['clusters']} | {r['rank']} | {r['tokens']} | {r['adapters']} "
            f"| {r['base_cold_ms']:.1f} ms | {_shared_added(r)} | {_pct(floor)} "
            f"| {_pct(r['composition_added_pct'])} "
            f"| {_pct(r.get('multi_lora_added_pct'))} | {_pct(r.get('peft_added_pct'))} "
            f"| {_ratio(r.get('multi_lora_added_time_speedup_vs_peft'))} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> Optional[Path]:
    """Added time over the base GEMM vs N (C = 1, R = 16): shared basis vs multi_lora vs PEFT."""
    plt = headless_pyplot()
    if plt is None:
        return None
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
    for axis, dtype in zip(axes, ("float32", "bfloat16")):
        for tokens, style in ((16, "-"), (256, "--")):
            for key, label, color in (("shared_added_pct", "shared_basis_lora", "tab:blue"),
                                      ("multi_lora_added_pct", "multi_lora", "tab:green"),
                                      ("peft_added_pct", "PEFT mixed batch", "tab:red")):
                points = sorted((r["adapters"], r[key]) for r in rows if r["dtype"] == dtype and r["clusters"] == 1
                                and r["rank"] == 16 and r["tokens"] == tokens and key in r)
                if points:
                    axis.plot(*zip(*points), style, marker="o", color=color, label=f"{label}, T={tokens}")
        axis.set_xscale("log")
        axis.set_yscale("symlog", linthresh=10)
        axis.set_xlabel("adapters N in the bank")
        axis.set_ylabel("added time over the cold base GEMM (%)")
        axis.set_title(f"{dtype}, R = 16, {rows[0]['d_in']}×{rows[0]['d_out']}")
        axis.grid(True, alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def run(configs: list[Config], out_dir: Optional[Path], *, with_peft: bool = True, stem: str = "shared_basis_cpu",
        progress: bool = True, samples: int = 15, passes: int = 1) -> tuple[list[dict], str]:
    """Runs every config `passes` times (the whole grid once per pass, so a config's passes lie
    minutes apart) with `samples` paired samples a pass; writes <stem>.json/.md/.png under out_dir;
    returns (rows, markdown)."""
    if passes < 1:
        raise ValueError(f"passes must be at least 1, got {passes}")
    machine = machine_description()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    flush, probe = CacheFlush(device), StreamProbe(device)
    ordered = sorted(configs, key=lambda c: (c.dtype, c.clusters, c.rank, c.adapters, c.tokens))
    measured: list[list[dict]] = [[] for _ in ordered]
    for pass_index in range(passes):
        cache_key, adapters, twin = None, None, None
        for index, cfg in enumerate(ordered):
            key = (cfg.dtype, cfg.clusters, cfg.rank, cfg.adapters, cfg.d_in, cfg.d_out)
            if key != cache_key:
                adapters = twin = None  # one bank in memory at a time
                adapters, twin, cache_key = _Adapters(cfg), _Adapters(_twin(cfg)), key
            measured[index].append(measure_config(cfg, adapters, probe, with_peft, flush, samples, twin))
            if progress:
                row = row_of(cfg, measured[index][-1:], probe)
                where = f"pass {pass_index + 1}/{passes} " if passes > 1 else ""
                print(f"[{where}{index + 1}/{len(ordered)}] {cfg.dtype} C={cfg.clusters} R={cfg.rank} "
                      f"T={cfg.tokens} N={cfg.adapters}: base {row['base_cold_ms']:.2f} ms, "
                      f"shared {_pct(row['shared_added_pct'])}"
                      + (f", multi_lora {_pct(row['multi_lora_added_pct'])}" if "multi_lora_added_pct" in row else "")
                      + (f", PEFT {_pct(row['peft_added_pct'])}" if "peft_added_pct" in row else ""), flush=True)
    rows = [row_of(cfg, one, probe) for cfg, one in zip(ordered, measured)]
    table = markdown_table(rows, machine)
    if out_dir is not None:
        payload = {"machine": machine, "torch": torch.__version__,
                   "lolakernels": lolakernels.__version__, "timing": "cold, paired (timing.cold_paired_samples)",
                   "samples": samples, "passes": passes, "rows": rows}
        write_results(out_dir, stem, payload, table)
        plot(rows, out_dir / f"{stem}.png")
    return rows, table
