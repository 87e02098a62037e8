"""Benchmark harness and cases behind ``python -m internlm_kernels bench`` and ``benchmarks/``."""
