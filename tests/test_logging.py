"""One logging set-up: a Flower warning reaches the terminal once, also after Opacus' import-time
logging.basicConfig, and spine-fl's own progress lines show while other libraries' INFO do not."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import logging
import spine_fl
import opacus  # calls logging.basicConfig at import
from flwr.common import log
log(logging.WARNING, "flower-warning-marker")
log(logging.INFO, "flower-info-marker")
logging.getLogger("spine_fl.server").info("spine-fl-progress-marker")
logging.getLogger("some.library").info("library-info-marker")
"""


def test_each_warning_is_printed_once_and_only_our_progress_at_info() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    output = done.stdout + done.stderr
    assert output.count("flower-warning-marker") == 1, output
    assert output.count("spine-fl-progress-marker") == 1, output
    assert "flower-info-marker" not in output and "library-info-marker" not in output
