"""Researchers' side: scenarios for Flower's simulation engine, the runner with pooled and local-only
baselines, synthetic consortia, the loopback deployment harness and benchmarks.
"""
