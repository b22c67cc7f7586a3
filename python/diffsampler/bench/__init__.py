"""Benchmarks: python -m diffsampler.bench."""
