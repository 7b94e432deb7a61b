"""Benchmark suite for ``speclora_kernels``.

``python -m benchmarks.run`` times every contender on identical inputs, prints a table and
writes CSV/JSON/PNG; ``pytest benchmarks/ --benchmark-only`` runs the same contenders
under pytest-benchmark. See ``benchmarks/run.py`` for the method notes.
"""
