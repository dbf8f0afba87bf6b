"""Benchmarks that write their figures, with the machine and command, to benchmarks/*.json."""
