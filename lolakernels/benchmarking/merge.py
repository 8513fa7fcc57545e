"""SVD merge benchmark: PEFT's ``add_weighted_adapter`` against the same call under
``lolakernels.peft.fast_merge`` (and ``svd_merge`` called directly), on one adapted
d_out × d_in weight holding n random adapters, in the same run.

For each (combination type, dtype) it reports seconds per merge, speed-ups over PEFT, and how far
the merged product B·A is from PEFT's (relative Frobenius difference; DARE runs after the same
``torch.manual_seed`` on both sides, so the masks are the same).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from ..merge.factored_svd import COMBINATION_TYPES
from .timing import machine_description, median_seconds, write_results


@dataclass(frozen=True)
class Config:
    combination_type: str
    dtype: str = "float32"
    adapters: int = 8
    rank: int = 16
    d_in: int = 4096
    d_out: int = 4096
    density: float = 0.5


def full_grid(d: int = 4096, adapters: int = 8, rank: int = 16) -> list[Config]:
    """Every SVD combination type in float32, plus ``svd`` with bfloat16 adapters."""
    grid = [Config(combination, "float32", adapters, rank, d, d) for combination in COMBINATION_TYPES]
    return grid + [Config("svd", "bfloat16", adapters, rank, d, d)]


def quick_grid(d: int = 1024) -> list[Config]:
    return full_grid(d)


class _Slot:
    """A one-layer PEFT model whose Linear holds ``cfg.adapters`` random adapters."""

    def __init__(self, cfg: Config, seed: int = 0):
        import peft

        dtype = getattr(torch, cfg.dtype)
        generator = torch.Generator().manual_seed(seed)
        model = torch.nn.Sequential()
        model.add_module("proj", torch.nn.Linear(cfg.d_in, cfg.d_out, bias=False, dtype=dtype))
        config = peft.LoraConfig(r=cfg.rank, lora_alpha=2 * cfg.rank, target_modules=["proj"])
        self.names = [f"a{i}" for i in range(cfg.adapters)]
        self.model = peft.get_peft_model(model, config, adapter_name=self.names[0], autocast_adapter_dtype=False)
        for name in self.names[1:]:
            self.model.add_adapter(name, config)
        self.layer = self.model.base_model.model.proj
        with torch.no_grad():
            for name in self.names:
                self.layer.lora_A[name].weight.data = (
                    torch.randn(cfg.rank, cfg.d_in, generator=generator) / cfg.d_in ** 0.5).to(dtype)
                self.layer.lora_B[name].weight.data = (
                    torch.randn(cfg.d_out, cfg.rank, generator=generator) / cfg.rank ** 0.5).to(dtype)
        self.weights = [1.0 / cfg.adapters + 0.05 * i for i in range(cfg.adapters)]
        self.cfg = cfg

    def merge(self) -> torch.Tensor:
        """One add_weighted_adapter call; returns the merged product and removes the adapter."""
        torch.manual_seed(0)
        self.model.add_weighted_adapter(self.names, self.weights, "merged", combination_type=self.cfg.combination_type,
                                        density=self.cfg.density)
        product = (self.layer.lora_B["merged"].weight.float() @ self.layer.lora_A["merged"].weight.float()).detach()
        self.model.delete_adapter("merged")
        return product

    def merge_function(self):
        from ..merge import svd_merge

        lora_a = [self.layer.lora_A[n].weight.detach() for n in self.names]
        lora_b = [self.layer.lora_B[n].weight.detach() for n in self.names]
        scalings = [self.layer.scaling[n] for n in self.names]
        return svd_merge(lora_a, lora_b, self.weights, self.cfg.combination_type, scalings=scalings,
                         density=self.cfg.density)


def run_config(cfg: Config, *, peft_runs: int = 1, with_peft: bool = True) -> dict:
    from ..peft import fast_merge

    slot = _Slot(cfg)
    row = asdict(cfg)
    handle = fast_merge(slot.model)
    fast_product = slot.merge()
    row["fast_merge_s"] = median_seconds(slot.merge, min_runs=3, min_seconds=1.0, warmup=0)
    row["svd_merge_s"] = median_seconds(slot.merge_function, min_runs=3, min_seconds=1.0, warmup=1)
    handle.restore()
    if with_peft:
        samples = []
        for _ in range(peft_runs):
            started = time.perf_counter()
            peft_product = slot.merge()
            samples.append(time.perf_counter() - started)
        row["peft_s"] = sorted(samples)[len(samples) // 2]
        row["peft_runs"] = peft_runs
        row["fast_merge_speedup"] = row["peft_s"] / row["fast_merge_s"]
        row["svd_merge_speedup"] = row["peft_s"] / row["svd_merge_s"]
        row["relative_difference"] = ((fast_product - peft_product).norm() / peft_product.norm()).item()
    return row


def _ratio(row: dict, key: str) -> str:
    return f"{row[key]:.0f}×" if key in row else "–"


def markdown_table(rows: list[dict], machine: str) -> str:
    first = rows[0]
    lines = [
        f"# SVD adapter merges on {machine}",
        "",
        f"One {first['d_out']}×{first['d_in']} weight, {first['adapters']} adapters of rank {first['rank']}, "
        f"merged to rank {first['rank']} (PEFT's default), density {first['density']} for the pruning types.",
        "PEFT: `add_weighted_adapter` as installed (dense deltas, full `torch.linalg.svd`). fast_merge: the same call",
        "on the patched model (median of ≥ 3). svd_merge: the function alone on the factors. Difference:",
        "‖B·A − B_PEFT·A_PEFT‖_F / ‖B_PEFT·A_PEFT‖_F of the merged adapters (same seed for DARE's masks).",
        "",
        "| combination | dtype | PEFT s | fast_merge s | svd_merge s | fast_merge vs PEFT | svd_merge vs PEFT "
        "| difference vs PEFT |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peft_s = f"{r['peft_s']:.2f}" if "peft_s" in r else "–"
        difference = f"{r['relative_difference']:.1e}" if "relative_difference" in r else "–"
        lines.append(f"| {r['combination_type']} | {r['dtype']} | {peft_s} | {r['fast_merge_s']:.3f} "
                     f"| {r['svd_merge_s']:.3f} | {_ratio(r, 'fast_merge_speedup')} "
                     f"| {_ratio(r, 'svd_merge_speedup')} | {difference} |")
    return "\n".join(lines) + "\n"


def run(configs: list[Config], out_dir: Optional[Path], *, stem: str = "svd_merge_cpu", peft_runs: int = 1,
        with_peft: bool = True, progress: bool = True, note: str = "") -> tuple[list[dict], str]:
    """Runs every config; writes <stem>.json/.md under out_dir; returns (rows, markdown)."""
    import lolakernels

    machine = machine_description()
    rows = []
    for index, cfg in enumerate(configs):
        row = run_config(cfg, peft_runs=peft_runs, with_peft=with_peft)
        rows.append(row)
        if progress:
            peft_part = f", PEFT {row['peft_s']:.2f} s ({row['fast_merge_speedup']:.0f}×)" if "peft_s" in row else ""
            print(f"[{index + 1}/{len(configs)}] {cfg.combination_type} {cfg.dtype} {cfg.d_out}x{cfg.d_in} "
                  f"n={cfg.adapters} r={cfg.rank}: fast_merge {row['fast_merge_s']:.3f} s{peft_part}", flush=True)
    table = markdown_table(rows, machine)
    if note:
        table += f"\n{note}\n"
    if out_dir is not None:
        payload = {"machine": machine, "torch": torch.__version__, "lolakernels": lolakernels.__version__,
                   "rows": rows, "note": note}
        try:
            import peft

            payload["peft"] = peft.__version__
        except ImportError:
            pass
        write_results(out_dir, stem, payload, table)
    return rows, table
