"""Benchmarks and experiments of the seed (run as `python -m maxjax.bench NAME`)."""
