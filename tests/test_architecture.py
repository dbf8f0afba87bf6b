"""The package layout's rules, checked on the source: who may import whom, and what the app bundle ships.

shared/ is what both sides need, so it imports nothing from client, server or simulations; a site
and the coordinator are separate programs, so client and server never import each other; and
neither depends on the research tooling in simulations."""

from __future__ import annotations

import ast
import io
import zipfile
from pathlib import Path

import pytest

from spine_fl.shared.runtime.bundle import build_bundle

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "shared": ("client", "server", "simulations"),
    "client": ("server", "simulations"),
    "server": ("client", "simulations"),
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every absolute module a file imports (at any depth: lazy imports count too)."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import; spine-fl imports absolutely"
            found.append((node.lineno, node.module or ""))
    return found


def violations(package: str) -> list[str]:
    out = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, module in imported_modules(path):
            parts = module.split(".")
            if parts[0] == "spine_fl" and len(parts) > 1 and parts[1] in FORBIDDEN[package]:
                out.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_follow_the_dependency_rule(package: str) -> None:
    assert violations(package) == []


def test_the_rule_check_catches_a_forbidden_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The walker itself must see a lazy import inside a function (else the rule test cannot fail)."""
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "bad.py").write_text("def f():\n    from spine_fl.server.app import app\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert violations("shared") == ["shared/bad.py:2 imports spine_fl.server.app"]


def test_app_bundle_holds_only_what_runs_at_a_site_or_the_coordinator() -> None:
    names = zipfile.ZipFile(io.BytesIO(build_bundle(ROOT).content)).namelist()
    code = [n for n in names if n.endswith(".py")]
    assert "client/app.py" in code and "server/app.py" in code and "shared/protocol.py" in code
    assert "client/privacy/mods.py" in code and "client/audit/run.py" in code
    assert not [n for n in names if n.startswith(("tests/", "simulations/", "benchmarks/", "scripts/"))]
