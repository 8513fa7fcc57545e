"""`lolakernels demo`: a one-minute comparison of shared-basis serving vs PEFT's mixed batch.

Synthetic adapters on one 1024×1024 layer: a JD-Full bank (one shared basis, an R×R Σ per
adapter) served with `shared_basis_lora`, the same adapters uncompressed served with
`multi_lora`, and PEFT's own mixed-batch forward (`adapter_names=`) on those adapters. It checks
that all three give PEFT's numbers, then prints the timing table.
"""
from __future__ import annotations

import time

from .benchmarking import shared_basis
from .benchmarking.timing import machine_description


def run_demo() -> None:
    started = time.perf_counter()
    print(f"lolakernels demo on {machine_description()}: one 1024x1024 layer, R = 16, JD-Full bank\n")
    rows, _ = shared_basis.run(shared_basis.quick_grid(), None, with_peft=True)
    print("\nagreement with PEFT's mixed batch (max |difference| / max |output|):")
    for r in rows:
        if "max_rel_error_shared_vs_peft" in r:
            print(f"  {r['dtype']:>8} T={r['tokens']:<3} N={r['adapters']:<3} shared_basis_lora "
                  f"{r['max_rel_error_shared_vs_peft']:.1e}, multi_lora {r['max_rel_error_multi_lora_vs_peft']:.1e}")
    print("\n| dtype | T | N | base ms | shared_basis_lora | multi_lora | PEFT mixed batch | speed-up vs PEFT |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['tokens']} | {r['adapters']} | {r['base_ms']:.3f} | {r['shared_ms']:.3f} ms "
              f"| {r['multi_lora_ms']:.3f} ms | {r['peft_ms']:.3f} ms | {r['shared_speedup_vs_peft']:.1f}x |")
    print(f"\n(bf16 rows: PEFT keeps adapters in fp32 by default, so its error is measured against an fp32 "
          f"LoRA branch.) Done in {time.perf_counter() - started:.0f} s.")
