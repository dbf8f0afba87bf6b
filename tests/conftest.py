"""Shared fixtures: a small synthetic consortium and the README's default run, each made once per
test session (per xdist worker: the files that use the run share one group)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spine_fl.cli import app
from spine_fl.simulations.synthetic.consortium import synthesize_consortium


@pytest.fixture(scope="session")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three synthetic sites with radiographs and MRI (the default seed)."""
    return synthesize_consortium(tmp_path_factory.mktemp("consortium"), n_sites=3, seed=7)


@pytest.fixture(scope="session")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """`spine-fl simulate` with nothing configured (the README's first command): its metrics.json and
    folder, checked by test_simulation.py and rendered by test_html_render.py."""
    out = tmp_path_factory.mktemp("default")
    result = CliRunner().invoke(app, ["simulate", "--scenario", "default", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return json.loads((out / "metrics.json").read_text()), out


# `make test` runs two pytest-xdist workers (`-n 2 --dist loadgroup --no-loadscope-reorder`): a test
# file is one group, so its module-scoped fixtures (a simulated run, a consortium) are made once; the
# real deployment engine's files are one group together, so two SuperLinks and their sites never
# compete for the cores at once; the files that use the default run are one group, so it runs once. Groups are handed out in collection order, heaviest first (seconds of
# a CI run on 2 cores in brackets), so that no long group starts last while the other worker idles;
# xdist's own order (most tests first) had started the deployment engine's at 85% of the run.
DEPLOYMENT_ENGINE = {"test_deployment", "test_control_plane"}
DEFAULT_RUN = {"test_simulation", "test_html_render"}
HEAVIEST_FIRST = ("deployment-engine",  # [750]
                  "default-run",  # [570]
                  "test_privacy_simulation",  # [390]
                  "test_attacks_coordinator",  # [190]
                  "test_benchmark_cli",  # [190]
                  "test_audit",  # [110]
                  "test_task_files")  # [100]; the rest take under 80 s each


def _group(item: pytest.Item) -> str:
    module = item.path.stem
    return "deployment-engine" if module in DEPLOYMENT_ENGINE else "default-run" if module in DEFAULT_RUN else module


def pytest_itemcollected(item: pytest.Item) -> None:
    """Marked as each test is collected: xdist reads the groups in its own collection_modifyitems."""
    item.add_marker(pytest.mark.xdist_group(_group(item)))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The heaviest groups first, the rest in file order (a stable sort keeps each file's own order)."""
    rank = {group: i for i, group in enumerate(HEAVIEST_FIRST)}
    items.sort(key=lambda item: rank.get(_group(item), len(rank)))
