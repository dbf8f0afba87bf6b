"""Shared fixtures: a small synthetic consortium, written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from spine_fl.simulations.synthetic.consortium import synthesize_consortium


@pytest.fixture(scope="session")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three synthetic sites with radiographs and MRI (the default seed)."""
    return synthesize_consortium(tmp_path_factory.mktemp("consortium"), n_sites=3, seed=7)


# `make test` runs two pytest-xdist workers (`-n 2 --dist loadgroup --no-loadscope-reorder`): a test
# file is one group, so its module-scoped fixtures (a simulated run, a consortium) are made once; the
# real deployment engine's files are one group together, so two SuperLinks and their sites never
# compete for the cores at once. Groups are handed out in collection order, heaviest first (seconds of
# a CI run on 2 cores in brackets), so that no long group starts last while the other worker idles;
# xdist's own order (most tests first) had started the deployment engine's at 85% of the run.
DEPLOYMENT_ENGINE = {"test_deployment", "test_control_plane"}
HEAVIEST_FIRST = ("deployment-engine",  # [750]
                  "test_simulation",  # [490]
                  "test_privacy_simulation",  # [390]
                  "test_html_render",  # [210]
                  "test_attacks_coordinator",  # [190]
                  "test_benchmark_cli",  # [190]
                  "test_audit",  # [110]
                  "test_task_files")  # [100]; the rest take under 80 s each


def _group(item: pytest.Item) -> str:
    module = item.path.stem
    return "deployment-engine" if module in DEPLOYMENT_ENGINE else module


def pytest_itemcollected(item: pytest.Item) -> None:
    """Marked as each test is collected: xdist reads the groups in its own collection_modifyitems."""
    item.add_marker(pytest.mark.xdist_group(_group(item)))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The heaviest groups first, the rest in file order (a stable sort keeps each file's own order)."""
    rank = {group: i for i, group in enumerate(HEAVIEST_FIRST)}
    items.sort(key=lambda item: rank.get(_group(item), len(rank)))
