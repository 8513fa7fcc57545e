"""`lolakernels bench serving`: mixed-batch generation tokens/s, PEFT vs accelerate vs attach_bank."""
from __future__ import annotations

from pathlib import Path

DEFAULT_RESULTS = Path("benchmarks") / "results"


def _bench_serving(args) -> int:
    from dataclasses import replace

    from ..benchmarking import serving

    grid = serving.quick_grid() if args.quick else serving.full_grid()
    if args.dtype:
        grid = [cfg for cfg in grid if cfg.dtype == args.dtype]
    if args.adapters:
        grid = [replace(grid[0], dtype=cfg.dtype, adapters=n) for cfg in {c.dtype: c for c in grid}.values()
                for n in args.adapters]
    if args.batch:
        grid = [replace(cfg, batch=args.batch) for cfg in grid]
    if args.new_tokens:
        grid = [replace(cfg, new_tokens=args.new_tokens) for cfg in grid]
    out_dir = None if args.no_save else Path(args.out)
    stem = args.stem or ("serving_quick" if args.quick else "serving_smollm2_cpu")
    _, table = serving.run(grid, out_dir, stem=stem)
    print(table)
    if out_dir is not None:
        print(f"wrote {out_dir / (stem + '.json')}, {out_dir / (stem + '.md')} and {out_dir / (stem + '.png')}")
    return 0


def register(commands, bench_suites) -> None:
    suite = bench_suites.add_parser(
        "serving", help="SmolLM2 mixed-batch generation tokens/s: PEFT vs accelerate vs attach_bank (1-256 adapters)")
    suite.add_argument("--quick", action="store_true", help="N = 1, 8 on a batch of 8, fp32 (a few minutes)")
    suite.add_argument("--dtype", choices=["float32", "bfloat16"], help="only this dtype")
    suite.add_argument("--adapters", type=int, nargs="+", help="numbers of adapters N (default 1 8 64 256)")
    suite.add_argument("--batch", type=int, help="sequences per batch (default 256; quick: 8)")
    suite.add_argument("--new-tokens", type=int, help="tokens generated per sequence (default 8)")
    suite.add_argument("--out", default=str(DEFAULT_RESULTS), help="results folder (default benchmarks/results)")
    suite.add_argument("--stem", help="file name stem of the results; rows already there for other configurations are kept")
    suite.add_argument("--no-save", action="store_true", help="print only")
    suite.set_defaults(handler=_bench_serving)
