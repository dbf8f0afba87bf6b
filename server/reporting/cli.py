"""`spine-fl report RUN_DIR`: write (or rewrite) the model card of a finished run."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

console = Console()


def report(run_dir: Path = typer.Argument(..., help="a run's results folder: the --out of `spine-fl simulate` "
                                                     "(it holds metrics.json)")) -> None:
    """Write the model card of a run: model_card.html (for people) and model_card.json (every number)."""
    from spine_fl.server.reporting.model_card import CARD_HTML, CARD_JSON, ModelCardError, write_model_card
    from spine_fl.server.reporting.run_result import unfinished_reason

    unfinished = unfinished_reason(run_dir)  # a folder a crashed or running simulation left
    if unfinished:
        console.print(f"[red]cannot write the model card:[/] {escape(str(run_dir))} holds no result: "
                      f"{escape(unfinished)}; run it again", highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    try:
        with console.status(f"writing the model card of {run_dir}..."):
            card = write_model_card(run_dir)
    except ModelCardError as exc:
        console.print(f"[red]cannot write the model card:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    for sentence in card["findings"].values():
        console.print(f"- {sentence}", highlight=False)
    console.print(f"model card: {run_dir / CARD_HTML} (numbers in {run_dir / CARD_JSON})", highlight=False,
                  soft_wrap=True)  # a path a reader can copy
