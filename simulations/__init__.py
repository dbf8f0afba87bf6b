"""Scenarios for Flower's simulation engine, with pooled and local-only baselines."""
