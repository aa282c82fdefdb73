"""Benchmarks: kernel A/B, end-to-end MFU, activation memory, GPU builds on the CPU, pytest-benchmark cases."""
import model  # noqa: F401  (checks that the `kernels` package is ours)
