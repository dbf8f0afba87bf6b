"""Every subcommand answers --help."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from spine_fl.cli import app


@pytest.mark.parametrize("args", [[], ["synth"], ["validate"], ["simulate"]])
def test_help_everywhere(args: list[str]) -> None:
    result = CliRunner().invoke(app, [*args, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output
