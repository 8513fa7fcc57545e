"""Subcommands of the `lolakernels` command, one module per family. Each module defines
``register(commands, bench_suites)`` adding its argparse subparsers with a ``handler``."""
