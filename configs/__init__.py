"""Packaged TOML configuration (federation, sites)."""
