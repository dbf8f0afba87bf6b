"""Shared fixtures: a small synthetic consortium, written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from spine_fl.simulations.synthetic.consortium import synthesize_consortium


@pytest.fixture(scope="session")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three synthetic sites with radiographs and MRI (the default seed)."""
    return synthesize_consortium(tmp_path_factory.mktemp("consortium"), n_sites=3, seed=7)


# `make test` runs two pytest-xdist workers (`-n 2 --dist loadgroup`): a test file is one group, so
# its module-scoped fixtures (a simulated run, a consortium) are made once; the real deployment engine's
# files are one group together, so two SuperLinks and their sites never compete for the cores at once.
DEPLOYMENT_ENGINE = {"test_deployment", "test_control_plane", "test_benchmark_cli"}  # the last: its deployment suite


def pytest_itemcollected(item: pytest.Item) -> None:
    """Marked as each test is collected: xdist reads the groups in its own collection_modifyitems."""
    module = item.path.stem
    item.add_marker(pytest.mark.xdist_group("deployment-engine" if module in DEPLOYMENT_ENGINE else module))
