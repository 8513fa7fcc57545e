"""`lolakernels compress`, `lolakernels bank info|export` and `lolakernels bench compress`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_RESULTS = Path("benchmarks") / "results"


def _clusters(text: str):
    if text == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


def _refused(error: Exception) -> int:
    print(f"error: {error}", file=sys.stderr)
    return 2


def _compress(args) -> int:
    from ..compress.joint import compress_adapters

    try:
        bank = compress_adapters(args.adapters, args.rank, method=args.method, clusters=args.clusters,
                                 weighting=args.weighting, max_iters=args.max_iters, tol=args.tol, seed=args.seed,
                                 device=args.device, progress=not args.quiet, target_error=args.target_error,
                                 density=args.density)
    except (ValueError, TypeError) as error:
        return _refused(error)
    path = bank.save(args.output)
    errors = bank.reconstruction_error()
    print(f"{len(bank.adapter_names)} adapters x {len(bank.slots)} slots -> {path} "
          f"({bank.method}, R = {bank.rank}); mean squared relative error {errors.mean():.4g}")
    return 0


def _info(args) -> int:
    from ..compress.bank import AdapterBank

    try:
        bank = AdapterBank.load(args.file)
    except ValueError as error:
        return _refused(error)
    errors = bank.reconstruction_error()
    clusters = [bank.num_clusters(slot) for slot in bank.slots]
    size = Path(args.file).stat().st_size
    lines = [
        f"file          {args.file} ({size / 2 ** 20:.2f} MiB)",
        f"method        {bank.method}, rank R = {bank.rank}",
        f"base model    {bank.base_model}",
        f"modules       {', '.join(bank.target_modules)}",
        f"slots         {len(bank.slots)}"
        + (f" (bases per slot: {min(clusters)}-{max(clusters)})" if clusters else ""),
        f"adapters      {len(bank.adapter_names)}",
    ]
    lines += [f"  {i:>4}  {name}  (mean error {error:.4g})"
              for i, (name, error) in enumerate(errors.by_adapter().items())]
    lines.append("mean squared relative error per module:")
    lines += [f"  {module:<16} {error:.4g}" for module, error in errors.by_module().items()]
    print("\n".join(lines))
    return 0


def _export(args) -> int:
    from ..compress.bank import AdapterBank

    try:
        bank = AdapterBank.load(args.file)
        out_dir = bank.export_peft(args.name, args.out_dir)
    except (ValueError, TypeError) as error:
        return _refused(error)
    print(f"wrote adapter {args.name!r} (rank {bank.rank}) to {out_dir}")
    return 0


def _bench(args) -> int:
    from ..benchmarking import compress

    configs = compress.quick_grid() if args.quick else compress.full_grid()
    if args.method:
        configs = [c for c in configs if c.method == args.method]
    out_dir = None if args.no_save else Path(args.out)
    stem = args.stem or ("compress_speed_quick" if args.quick else "compress_speed_cpu")
    _, table = compress.run(configs, out_dir, stem=stem)
    print(table)
    if out_dir is not None:
        print(f"wrote {out_dir / (stem + '.json')} and {out_dir / (stem + '.md')}")
    return 0


def register(commands, bench_suites) -> None:
    from ..compress.bank import METHODS

    compress = commands.add_parser("compress", help="jointly compress PEFT LoRA adapters into an adapter bank")
    compress.add_argument("adapters", nargs="+", metavar="DIR", help="PEFT adapter directories")
    compress.add_argument("--rank", type=int, default=16, help="rank R of the shared bases (default 16)")
    compress.add_argument("--method", choices=METHODS, default="jd-full")
    compress.add_argument("--clusters", type=_clusters, default=1, help="bases per slot, or 'auto' with --target-error")
    compress.add_argument("--target-error", type=float, help="mean squared relative error for --clusters auto")
    compress.add_argument("--weighting", choices=["unit", "none"], default="unit")
    compress.add_argument("--max-iters", type=int, default=100)
    compress.add_argument("--tol", type=float, default=1e-6)
    compress.add_argument("--seed", type=int, default=0)
    compress.add_argument("--device", help="torch device to compute on (default cpu)")
    compress.add_argument("--density", type=float, default=0.2, help="fraction of entries TIES keeps (method ties)")
    compress.add_argument("-o", "--output", required=True, help="bank file to write (.safetensors)")
    compress.add_argument("--quiet", action="store_true", help="no progress bar")
    compress.set_defaults(handler=_compress)

    bank = commands.add_parser("bank", help="inspect an adapter bank or export one adapter as a PEFT adapter")
    actions = bank.add_subparsers(dest="bank_command", required=True)
    info = actions.add_parser("info", help="method, rank, base model, adapters, errors per module")
    info.add_argument("file")
    info.set_defaults(handler=_info)
    export = actions.add_parser("export", help="write one adapter as a standard PEFT adapter of rank R")
    export.add_argument("file")
    export.add_argument("name")
    export.add_argument("out_dir")
    export.set_defaults(handler=_export)

    bench = bench_suites.add_parser("compress", help="compress_adapters speed: 1000 adapters, one 4096x4096 slot")
    bench.add_argument("--quick", action="store_true", help="a small smoke run (200 adapters, d = 1024)")
    bench.add_argument("--method", choices=["jd-full", "jd-diag"], help="only this method")
    bench.add_argument("--out", default=str(DEFAULT_RESULTS), help="results folder (default benchmarks/results)")
    bench.add_argument("--stem", help="file name stem of the results")
    bench.add_argument("--no-save", action="store_true", help="print only")
    bench.set_defaults(handler=_bench)
