"""Benchmarks are run on demand: `python -m pytest bench/ --benchmark-only`."""
