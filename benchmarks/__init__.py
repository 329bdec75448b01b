"""Benchmarks of gill_pipeline, each run from the repository root as `python -m benchmarks.bench_<name>`."""
