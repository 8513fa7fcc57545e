"""`lolakernels bench nf4`: the nf4 + LoRA layer against bitsandbytes + PEFT and a dense layer."""
from __future__ import annotations

from pathlib import Path

DEFAULT_RESULTS = Path("benchmarks") / "results"


def _bench_nf4(args) -> int:
    from ..benchmarking import nf4

    grid = nf4.quick_grid() if args.quick else nf4.full_grid()
    if args.dtype:
        grid = [cfg for cfg in grid if cfg.dtype == args.dtype]
    if args.tokens:
        grid = [cfg for cfg in grid if cfg.tokens in args.tokens]
    out_dir = None if args.no_save else Path(args.out)
    stem = args.stem or ("nf4_quick" if args.quick else "nf4_cpu")
    _, table = nf4.run(grid, out_dir, stem=stem, note=args.note or "")
    print(table)
    if out_dir is not None:
        print(f"wrote {out_dir / (stem + '.json')} and {out_dir / (stem + '.md')}")
    return 0


def register(commands, bench_suites) -> None:
    parser = bench_suites.add_parser("nf4", help="nf4_lora_linear vs bitsandbytes Linear4bit + PEFT and dense + LoRA")
    parser.add_argument("--quick", action="store_true", help="a short run at 1024 x 1024")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="only this compute dtype")
    parser.add_argument("--tokens", type=int, nargs="+", help="only these token counts M")
    parser.add_argument("--note", help="a line for the report (e.g. how busy the machine was)")
    parser.add_argument("--out", default=str(DEFAULT_RESULTS), help="results folder (default benchmarks/results)")
    parser.add_argument("--stem", help="file name stem of the results")
    parser.add_argument("--no-save", action="store_true", help="print only")
    parser.set_defaults(handler=_bench_nf4)
