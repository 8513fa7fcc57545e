"""`lolakernels lorap` (LoRAP compression + perplexity study) and `lolakernels bench awsvd`."""
from __future__ import annotations

import sys
from pathlib import Path

DEFAULT_RESULTS = Path("benchmarks") / "results"
STUDY_RATIOS = (0.1, 0.2, 0.3)


def _lorap(args) -> int:
    import torch
    import transformers

    from .. import models
    from ..benchmarking import perplexity
    from ..benchmarking.timing import machine_description

    reason = models.smollm2_missing_reason()
    if reason is not None:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    model = models.load_smollm2(torch.float32)
    tokenizer = models.load_smollm2_tokenizer()
    split = perplexity.split_text(tokenizer, seq_len=args.seq_len, calibration_sequences=args.calib_sequences,
                                  heldout_sequences=args.eval_sequences)
    print(split.describe())
    try:
        payload = perplexity.run_lorap_study(model, split, args.ratio or STUDY_RATIOS, args.deco, mlp=args.mlp,
                                             para_allocate=args.para_allocate, progress=not args.quiet)
    except (ValueError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    payload.update({"model": models.SMOLLM2_NAME, "machine": machine_description(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "seq_len": args.seq_len})
    print(perplexity.study_markdown(payload))
    if not args.no_save:
        json_path, md_path = perplexity.write_study(payload, Path(args.out), args.stem)
        print(f"wrote {json_path} and {md_path}")
    return 0


def _bench_awsvd(args) -> int:
    from ..benchmarking import awsvd as bench

    grid = bench.quick_grid() if args.quick else bench.full_grid()
    out_dir = None if args.no_save else Path(args.out)
    stem = args.stem or ("awsvd_quick" if args.quick else "awsvd_cpu")
    _, table = bench.run(grid, out_dir, stem=stem)
    print(table)
    if out_dir is not None:
        print(f"wrote {out_dir / (stem + '.json')}, {out_dir / (stem + '.md')} and {out_dir / (stem + '.png')}")
    return 0


def register(commands, bench_suites) -> None:
    lorap = commands.add_parser(
        "lorap", help="LoRAP-compress SmolLM2-135M-Instruct; perplexity before/after, awsvd vs plain svd")
    lorap.add_argument("--ratio", type=float, action="append",
                       help="fraction of decoder-layer parameters to remove (repeatable; default 0.1, 0.2, 0.3)")
    lorap.add_argument("--deco", nargs="+", choices=["awsvd", "svd"], default=["awsvd", "svd"],
                       help="attention factorization(s) to compare (default both)")
    lorap.add_argument("--mlp", choices=["prune", "decompose"], default="prune", help="MLP compression (default prune)")
    lorap.add_argument("--para-allocate", type=float, default=3.0,
                       help="kept parameters of (W_v + W_o) / (W_q + W_k) (default 3)")
    lorap.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    lorap.add_argument("--calib-sequences", type=int, default=32, help="calibration sequences (default 32)")
    lorap.add_argument("--eval-sequences", type=int, default=32, help="held-out perplexity windows (default 32)")
    lorap.add_argument("--out", default=str(DEFAULT_RESULTS), help="results folder (default benchmarks/results)")
    lorap.add_argument("--stem", default="lorap_smollm2", help="file name stem of the results")
    lorap.add_argument("--no-save", action="store_true", help="print only")
    lorap.add_argument("--quiet", action="store_true", help="no progress bars")
    lorap.set_defaults(handler=_lorap)

    bench = bench_suites.add_parser(
        "awsvd", help="awsvd (randomized, gram) vs the full-SVD route: time and weighted error vs the optimum")
    bench.add_argument("--quick", action="store_true", help="a small smoke run (1024-sized matrices)")
    bench.add_argument("--out", default=str(DEFAULT_RESULTS), help="results folder (default benchmarks/results)")
    bench.add_argument("--stem", help="file name stem of the results")
    bench.add_argument("--no-save", action="store_true", help="print only")
    bench.set_defaults(handler=_bench_awsvd)
