"""Benchmarks of the engine against the limits it must not be the bottleneck for.

`python -m benchmarks.run` (or `make bench`) runs them all and writes BENCHMARKS.md;
`--quick` (`make bench-quick`) runs reduced sizes in under two minutes. Every figure is measured
side by side with its reference in the same run on the same machine, and reported as a ratio.
"""
