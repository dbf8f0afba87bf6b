"""Shared fixtures: a small synthetic consortium, written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from spine_fl.simulations.synthetic.consortium import synthesize_consortium


@pytest.fixture(scope="session")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three synthetic sites with radiographs and MRI (the default seed)."""
    return synthesize_consortium(tmp_path_factory.mktemp("consortium"), n_sites=3, seed=7)
