"""The quality benchmark: how much task accuracy joint compression of real LoRA adapters keeps.

    python benchmarks/quality/run.py                      # everything, one process
    python benchmarks/quality/run.py --shard 0/2 &        # or split the configurations
    python benchmarks/quality/run.py --shard 1/2          #   over two processes

Trains (or loads cached) one r = 8 adapter per task on SmolLM2-135M-Instruct, compresses all of
them at R ∈ {8, 16, 32, 64} × {jd-diag, jd-full} × clusters ∈ {1, 2, 4}, evaluates every task,
and writes benchmarks/results/compress_quality.{json,md,png}. See README.md next to this file.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from lolakernels.benchmarking import compress_quality
from lolakernels.benchmarking.train_lora import TrainConfig

RESULTS = Path(__file__).resolve().parents[1] / "results"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shard", default="0/1", help="i/n: evaluate every n-th configuration from the i-th")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process (1 by default: on a shared 2-core machine one thread "
                             "per process runs several times faster than two fighting over busy cores)")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps, help="training steps per adapter")
    parser.add_argument("--eval-examples", type=int, default=compress_quality.EVAL_EXAMPLES)
    parser.add_argument("--ranks", default=",".join(map(str, compress_quality.RANKS)))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--report-only", action="store_true",
                        help="evaluate nothing; write the report from the evaluations cached so far")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    index, count = (int(part) for part in args.shard.split("/"))
    ranks = {int(rank) for rank in args.ranks.split(",")}
    configs = [config for config in compress_quality.full_grid() if config.rank in ranks]
    payload = compress_quality.run(configs, args.out, train_config=TrainConfig(steps=args.steps),
                                   eval_count=args.eval_examples, shard=(index, count),
                                   report_only=args.report_only)
    if payload is None:
        return 0
    print(f"wrote {args.out / 'compress_quality.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
