"""The `lolakernels` command: info, bench, demo, and the commands of each family
(compress/bank, lorap, ...) registered from `lolakernels.commands`."""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

DEFAULT_RESULTS = Path("benchmarks") / "results"

# Each module defines register(commands, bench_suites).
COMMAND_MODULES = (
    "lolakernels.commands.compress",
    "lolakernels.commands.nf4",
    "lolakernels.commands.awsvd",
    "lolakernels.commands.merge",
    "lolakernels.commands.serving",
)


def _info(args) -> int:
    from ._info import info

    info()
    return 0


def _bench_shared_basis(args) -> int:
    from .benchmarking import shared_basis

    if args.quick:
        grid = shared_basis.quick_grid()
    elif args.decode:
        grid = shared_basis.decode_grid(args.dim)
    else:
        grid = shared_basis.full_grid(args.dim)
    if args.dtype:
        grid = [cfg for cfg in grid if cfg.dtype == args.dtype]
    out_dir = None if args.no_save else Path(args.out)
    stem = args.stem or ("shared_basis_quick" if args.quick else
                         "shared_basis_decode_cpu" if args.decode else "shared_basis_cpu")
    passes = args.passes if args.passes is not None else (1 if args.quick else 3)
    rows, table = shared_basis.run(grid, out_dir, with_peft=not args.no_peft, stem=stem, passes=passes)
    print(table)
    if out_dir is not None:
        print(f"wrote {out_dir / (stem + '.json')}, {out_dir / (stem + '.md')} and {out_dir / (stem + '.png')}")
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    run_demo()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lolakernels", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, built extensions, usable backends, CPU features, GPU").set_defaults(
        handler=_info)
    bench = commands.add_parser("bench", help="run a benchmark and write JSON + markdown (+ PNG)")
    suites = bench.add_subparsers(dest="suite", required=True)
    shared = suites.add_parser("shared-basis", help="shared_basis_lora / multi_lora vs base GEMM, composition, PEFT")
    shared.add_argument("--quick", action="store_true", help="a one-minute subset at d = 1024")
    shared.add_argument("--decode", action="store_true",
                        help="the decode shapes only: one adapter per token, N = T in {16, 64, 256}, C = 1")
    shared.add_argument("--dim", type=int, default=4096, help="d_in = d_out (default 4096)")
    shared.add_argument("--dtype", choices=["float32", "bfloat16"], help="only this dtype")
    shared.add_argument("--no-peft", action="store_true", help="skip the PEFT mixed-batch baseline")
    shared.add_argument("--passes", type=int,
                        help="times the whole grid is run; each row pools its passes (default 3, 1 with --quick)")
    shared.add_argument("--out", default=str(DEFAULT_RESULTS), help="results folder (default benchmarks/results)")
    shared.add_argument("--stem", help="file name stem of the results")
    shared.add_argument("--no-save", action="store_true", help="print only")
    shared.set_defaults(handler=_bench_shared_basis)
    commands.add_parser("demo", help="SmolLM2 end to end: a few adapters, compressed into a bank, one mixed batch served vs PEFT").set_defaults(
        handler=_demo)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(commands, suites)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
