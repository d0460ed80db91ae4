# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Benchmarks runnable as ``python -m benchmarks.<name>``."""
