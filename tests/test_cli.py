"""Every subcommand answers --help."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from spine_fl.cli import app


@pytest.mark.parametrize("args", [[], ["synth"], ["validate"], ["simulate"], ["server"], ["client"], ["certs"], ["enroll"], ["bundle", "hash"], ["ledger", "verify"], ["report"], ["audit"]])
def test_help_everywhere(args: list[str]) -> None:
    result = CliRunner().invoke(app, [*args, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output


def test_bundle_hash_is_the_sha256_of_the_bundle_the_server_submits() -> None:
    from spine_fl.shared.runtime.bundle import build_bundle

    result = CliRunner().invoke(app, ["bundle", "hash"])
    assert result.exit_code == 0
    assert result.output.strip() == build_bundle().sha256 and len(result.output.strip()) == 64
