"""Runs that compare: the study of variants over seeds (study.py) and the benchmarks (bench.py)."""
