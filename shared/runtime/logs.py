"""One logging set-up for every process spine-fl starts (CLI, ServerApp, ClientApp, Ray workers).

Why here and once: Opacus calls `logging.basicConfig` at import and Flower's logger has a console
handler of its own *and* propagates to the root logger, so without this every Flower warning is
printed twice and Opacus' format competes with ours. Here the root logger gets one rich handler;
Flower's own console handler is removed so that its records reach the terminal once, through it.
"""

from __future__ import annotations

import logging

from rich.console import Console
from rich.logging import RichHandler

SPINE_FL_LOGGER = "spine_fl"
FLOWER_LOGGER = "flwr"
_MARK = "_spine_fl_handler"


def configure_logging(level: int = logging.WARNING, spine_fl_level: int = logging.INFO) -> None:
    """Idempotent: spine-fl's own messages at `spine_fl_level`, everything else (Flower, Ray,
    Opacus) from `level` up, each once, on stderr."""
    root = logging.getLogger()
    if not any(getattr(h, _MARK, False) for h in root.handlers):
        handler = RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False,
                              log_time_format="%H:%M:%S")
        setattr(handler, _MARK, True)
        root.addHandler(handler)
    root.setLevel(level)
    import flwr.common.logger  # noqa: F401  (Flower adds its console handler at import: import it, then remove it)

    flower = logging.getLogger(FLOWER_LOGGER)
    for handler in list(flower.handlers):
        if type(handler).__name__ == "ConsoleHandler":
            flower.removeHandler(handler)
    flower.setLevel(level)
    flower.propagate = True
    logging.getLogger(SPINE_FL_LOGGER).setLevel(spine_fl_level)
