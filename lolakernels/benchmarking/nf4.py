"""nf4 + LoRA benchmark: one QLoRA linear layer, the fused lolakernels op against the real stack.

For each (weight shape N×K, tokens M, compute dtype) it times, in the same run:
  ours        lolakernels.nf4_lora_linear (weight and adapter warm in cache)
  ours_cold   the same, cycling over enough copies of the packed weight to overflow the caches
  bnb_peft    PEFT's lora.bnb.Linear4bit over bitsandbytes' Linear4bit, eval mode (bitsandbytes'
              own CPU inference path: it repacks the weight on the first call)
  dense_lora  PEFT's lora.Linear over a dense nn.Linear in the compute dtype
and reports ratios and, for M = 1, the fraction of the read bandwidth (docs/design.md §7 bytes: packed
weight + absmax codes + adapter + activations, over time and bandwidth). The bandwidth is a
streaming read timed among each row's own rounds (timing.StreamProbe): this machine's drifts by up
to 2x within minutes, so one measurement at the start of a run misstates the later rows.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

import lolakernels

from .timing import StreamProbe, interleaved_seconds, machine_description, write_results

RANK = 16
BLOCKSIZE = 64
COLD_BYTES = 256 << 20  # copies of the packed weight cycled through for the cold-cache timing


@dataclass(frozen=True)
class Config:
    out_features: int
    in_features: int
    tokens: int
    dtype: str


def full_grid() -> list[Config]:
    shapes = ((4096, 4096), (11008, 4096), (4096, 11008))
    return [Config(n, k, m, dtype) for (n, k), m, dtype in
            itertools.product(shapes, (1, 4, 16, 128), ("bfloat16", "float32"))]


def quick_grid() -> list[Config]:
    return [Config(1024, 1024, m, dtype) for m, dtype in itertools.product((1, 16), ("bfloat16", "float32"))]


class _Layer:
    """One nf4 weight and rank-16 adapter, as lolakernels reads it and as PEFT / a dense layer run it."""

    def __init__(self, out_features: int, in_features: int, dtype: torch.dtype, seed: int = 0):
        import bitsandbytes as bnb
        import peft

        generator = torch.Generator().manual_seed(seed)
        weight = torch.randn(out_features, in_features, generator=generator) * in_features ** -0.5
        self.lora_a = torch.randn(RANK, in_features, generator=generator) * in_features ** -0.5
        self.lora_b = torch.randn(out_features, RANK, generator=generator) * RANK ** -0.5
        self.scale = 2.0
        quantized = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=dtype, quant_type="nf4")
        quantized.weight = bnb.nn.Params4bit(weight.to(dtype), requires_grad=False, quant_type="nf4",
                                             blocksize=BLOCKSIZE).to("cpu")
        state = quantized.weight.quant_state
        # lolakernels reads its own copy: bitsandbytes' eval forward repacks the layer's weight in place.
        self.packed = quantized.weight.data.clone()
        self.state = state.__class__(absmax=state.absmax.clone(), shape=state.shape, code=state.code,
                                     blocksize=state.blocksize, quant_type=state.quant_type, dtype=state.dtype,
                                     offset=state.offset, state2=state.state2)
        copies = max(1, COLD_BYTES // self.packed.numel())
        self.cold_copies = [self.packed.clone() for _ in range(copies)]
        self.peft_nf4 = self._peft(quantized, peft)
        dense = torch.nn.Linear(in_features, out_features, bias=False, dtype=dtype)
        dense.weight.data.copy_(lolakernels.nf4_dequantize(self.packed, self.state, out_dtype=dtype))
        self.peft_dense = self._peft(dense, peft)

    def _peft(self, base, peft):
        model = torch.nn.Sequential(base)
        model.is_loaded_in_4bit = not isinstance(base, torch.nn.Linear)
        config = peft.LoraConfig(r=RANK, lora_alpha=RANK * self.scale, target_modules=["0"])
        layer = peft.get_peft_model(model, config).base_model.model[0]
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(self.lora_a)
            layer.lora_B["default"].weight.copy_(self.lora_b)
        return layer.eval()


def _bytes_read(cfg: Config, element_size: int) -> int:
    """docs/design.md §7: packed weight + 1-byte absmax codes + fp32 adapter + activations in and out."""
    n, k = cfg.out_features, cfg.in_features
    return n * k // 2 + n * k // BLOCKSIZE + 4 * RANK * (n + k) + cfg.tokens * (k + n) * element_size


def run_config(cfg: Config, layer: _Layer, probe: StreamProbe, rounds: int = 3, min_seconds: float = 0.3) -> dict:
    dtype = getattr(torch, cfg.dtype)
    x = torch.randn(cfg.tokens, cfg.in_features, generator=torch.Generator().manual_seed(cfg.tokens)).to(dtype)
    cold = itertools.cycle(layer.cold_copies)

    def ours():
        return lolakernels.nf4_lora_linear(x, layer.packed, layer.state, layer.lora_a, layer.lora_b, layer.scale)

    def ours_cold():
        return lolakernels.nf4_lora_linear(x, next(cold), layer.state, layer.lora_a, layer.lora_b, layer.scale)

    def bnb_peft():
        return layer.peft_nf4(x)

    def dense_lora():
        return layer.peft_dense(x)

    methods = {"ours": ours, "ours_cold": ours_cold, "bnb_peft": bnb_peft, "dense_lora": dense_lora, "stream": probe}
    row = asdict(cfg)
    with torch.no_grad():
        reference = dense_lora().float()
        row["max_rel_diff_vs_dense_peft"] = float((ours().float() - reference).abs().max() /
                                                  reference.abs().max())
        times = interleaved_seconds(methods, rounds=rounds, min_seconds=min_seconds)
    bandwidth = probe.bytes_per_second(times.pop("stream"))
    for name, seconds in times.items():
        row[f"{name}_ms"] = seconds * 1e3
    row["speedup_vs_bnb_peft"] = times["bnb_peft"] / times["ours"]
    row["time_vs_dense_lora"] = times["ours"] / times["dense_lora"]
    row["bytes_read"] = _bytes_read(cfg, x.element_size())
    row["read_bandwidth_bytes_per_s"] = bandwidth
    row["fraction_of_bandwidth_cold"] = row["bytes_read"] / times["ours_cold"] / bandwidth
    row["fraction_of_bandwidth_warm"] = row["bytes_read"] / times["ours"] / bandwidth
    return row


def _fmt(value, digits=2):
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def markdown_table(rows: list[dict], machine: str, note: str = "") -> str:
    rates = [r["read_bandwidth_bytes_per_s"] / 1e9 for r in rows]
    measured = f"{min(rates):.1f}–{max(rates):.1f} GB/s in this run" if rates else "no rows"
    lines = [
        f"# nf4 + LoRA (r = {RANK}) on {machine}",
        "",
        f"Read bandwidth: a streaming read timed among each row's own calls (GB/s column), {measured}. "
        f"Blocksize {BLOCKSIZE}, double quantization, PEFT's fp32 adapter. Each time is the best of 3 "
        "interleaved medians.",
        "bnb + PEFT: PEFT's lora.bnb.Linear4bit in eval mode (bitsandbytes' repacked CPU kernel, which computes "
        "in bf16 with bf16-rounded absmax whatever the input dtype: its float32 rows are not float32 products, "
        "ours are); dense: PEFT "
        "LoRA over nn.Linear in the compute dtype. Bandwidth fraction (M = 1): bytes read / time / bandwidth, "
        "cold = weights cycled through more memory than the caches hold.",
    ]
    if note:
        lines += ["", note]
    lines += [
        "",
        "| N × K | M | dtype | ours ms | ours cold ms | bnb + PEFT ms | dense + LoRA ms | vs bnb + PEFT "
        "| time / dense | GB/s | bandwidth (cold) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fraction = f"{100 * r['fraction_of_bandwidth_cold']:.0f}%" if r["tokens"] == 1 else "–"
        lines.append(
            f"| {r['out_features']} × {r['in_features']} | {r['tokens']} | {r['dtype']} | {_fmt(r['ours_ms'], 3)} "
            f"| {_fmt(r['ours_cold_ms'], 3)} | {_fmt(r['bnb_peft_ms'], 3)} | {_fmt(r['dense_lora_ms'], 3)} "
            f"| {_fmt(r['speedup_vs_bnb_peft'])}× | {_fmt(r['time_vs_dense_lora'])}× "
            f"| {r['read_bandwidth_bytes_per_s'] / 1e9:.1f} | {fraction} |")
    return "\n".join(lines) + "\n"


def run(configs: list[Config], out_dir: Optional[Path], *, stem: str = "nf4_cpu", note: str = "",
        progress: bool = True, rounds: int = 3, min_seconds: float = 0.3) -> tuple[list[dict], str]:
    """Runs every config; writes <stem>.json/.md under out_dir; returns (rows, markdown). Each
    method's time is its best median over `rounds` interleaved rounds of at least min_seconds."""
    probe = StreamProbe()
    machine = machine_description()
    rows = []
    key, layer = None, None
    ordered = sorted(configs, key=lambda c: (c.dtype, c.out_features, c.in_features, c.tokens))
    for index, cfg in enumerate(ordered):
        if key != (cfg.dtype, cfg.out_features, cfg.in_features):
            layer = None
            layer = _Layer(cfg.out_features, cfg.in_features, getattr(torch, cfg.dtype))
            key = (cfg.dtype, cfg.out_features, cfg.in_features)
        row = run_config(cfg, layer, probe, rounds, min_seconds)
        rows.append(row)
        if progress:
            print(f"[{index + 1}/{len(ordered)}] {cfg.out_features}x{cfg.in_features} M={cfg.tokens} {cfg.dtype}: "
                  f"ours {row['ours_ms']:.3f} ms, bnb+PEFT {row['bnb_peft_ms']:.3f} ms, "
                  f"dense {row['dense_lora_ms']:.3f} ms", flush=True)
    table = markdown_table(rows, machine, note)
    if out_dir is not None:
        payload = {"machine": machine, "torch": torch.__version__,
                   "lolakernels": lolakernels.__version__, "note": note, "rows": rows}
        write_results(out_dir, stem, payload, table)
    return rows, table
