"""Benchmark runners behind `lolakernels bench ...` and benchmarks/*.py."""
