"""Benchmarks: the CPU suite (`python -m sdtune.bench`) and the reference loop it compares against."""
