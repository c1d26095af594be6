"""Benchmarks: each `bench/NAME.py` runs on its own as `python -m bench.NAME`.

Results, the machine and the command go into docs/benchmarks.md.
"""
