"""Benchmarks: throughput (non-overlap / nano-batch / overlap / peer), GEMM peak, per-op profile."""
