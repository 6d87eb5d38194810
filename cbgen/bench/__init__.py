"""Throughput and latency benchmarks: cbgen against transformers baselines (``cbgen bench``)."""

from .suite import SYSTEMS, WORKLOADS, BenchOptions, run_bench

__all__ = ["BenchOptions", "run_bench", "SYSTEMS", "WORKLOADS"]
