"""Benchmarks (not tests): ``python -m bench.bench_save`` and ``python -m bench.bench_load``.

See ``docs/performance.md`` for the method and the figures.
"""
