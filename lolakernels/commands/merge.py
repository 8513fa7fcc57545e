"""`lolakernels bench merge`: PEFT's SVD adapter merges against fast_merge / svd_merge."""
from __future__ import annotations

from pathlib import Path

DEFAULT_RESULTS = Path("benchmarks") / "results"


def _bench(args) -> int:
    from ..benchmarking import merge

    grid = merge.quick_grid() if args.quick else merge.full_grid(args.dim, args.adapters, args.rank)
    if args.combination:
        grid = [cfg for cfg in grid if cfg.combination_type == args.combination]
    out_dir = None if args.no_save else Path(args.out)
    stem = args.stem or ("svd_merge_quick" if args.quick else "svd_merge_cpu")
    _, table = merge.run(grid, out_dir, stem=stem, peft_runs=args.peft_runs, with_peft=not args.no_peft,
                            note=args.note or "")
    print(table)
    if out_dir is not None:
        print(f"wrote {out_dir / (stem + '.json')} and {out_dir / (stem + '.md')}")
    return 0


def register(commands, bench_suites) -> None:
    from ..merge.factored_svd import COMBINATION_TYPES

    bench = bench_suites.add_parser("merge", help="SVD adapter merges (add_weighted_adapter) vs PEFT, 4096x4096")
    bench.add_argument("--quick", action="store_true", help="a smoke run at d = 1024")
    bench.add_argument("--dim", type=int, default=4096, help="d_in = d_out (default 4096)")
    bench.add_argument("--adapters", type=int, default=8, help="adapters merged (default 8)")
    bench.add_argument("--rank", type=int, default=16, help="rank of each adapter and of the merge (default 16)")
    bench.add_argument("--combination", choices=COMBINATION_TYPES, help="only this combination type")
    bench.add_argument("--peft-runs", type=int, default=1, help="PEFT merges timed per case (median; default 1)")
    bench.add_argument("--no-peft", action="store_true", help="skip the PEFT baseline")
    bench.add_argument("--note", help="a line appended to the markdown (e.g. machine load)")
    bench.add_argument("--out", default=str(DEFAULT_RESULTS), help="results folder (default benchmarks/results)")
    bench.add_argument("--stem", help="file name stem of the results")
    bench.add_argument("--no-save", action="store_true", help="print only")
    bench.set_defaults(handler=_bench)
