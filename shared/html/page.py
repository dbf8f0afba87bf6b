"""Self-contained HTML reports (audit, model card): one file, plots embedded as data URIs, no
scripts and no network requests, so a privacy officer can open it offline in any browser."""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

VERDICT_COLOURS = {"pass": "#1b7f3b", "attention": "#b26a00", "fail": "#b00020"}

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:980px;margin:2em auto;
padding:0 1em;color:#1d1d1f;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}th,td{border:1px solid #ccc;padding:.25em .6em;
text-align:left;vertical-align:top}th{background:#f3f3f3}.num{text-align:right;font-variant-numeric:tabular-nums}
.verdict{padding:.8em 1em;border-radius:6px;color:#fff;font-size:1.15em;margin:1em 0}
.note{color:#555;font-size:.92em}img{max-width:100%;height:auto;border:1px solid #eee}
ul.reasons{margin:.3em 0 .3em 1.2em}
"""


def escape(value: Any) -> str:
    return html.escape(str(value), quote=True)


def figure_to_img(fig: plt.Figure, alt: str) -> str:
    """Render a matplotlib figure to an embedded PNG <img> and close it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{data}">'


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain table; numbers are right-aligned, everything is escaped."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(
            f'<td class="num">{escape(_fmt(c))}</td>' if isinstance(c, (int, float)) and not isinstance(c, bool)
            else f"<td>{escape(c)}</td>" for c in row) + "</tr>"
        for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value: float | int) -> str:
    if isinstance(value, int):
        return str(value)
    return f"{value:.3g}" if abs(value) < 1e-3 and value != 0 else f"{value:.3f}"


def verdict_banner(verdict: str, reasons: Sequence[str]) -> str:
    colour = VERDICT_COLOURS.get(verdict, "#444")
    items = "".join(f"<li>{escape(r)}</li>" for r in reasons)
    return (f'<div class="verdict" style="background:{colour}"><strong>Verdict: {escape(verdict.upper())}</strong>'
            f'<ul class="reasons">{items}</ul></div>')


@dataclass
class Section:
    """A titled part of a report: a plain-language summary first, then tables/plots (HTML fragments)."""

    title: str
    summary: str
    parts: list[str] = field(default_factory=list)

    def render(self) -> str:
        return f"<section><h2>{escape(self.title)}</h2><p>{escape(self.summary)}</p>{''.join(self.parts)}</section>"


def render_page(title: str, subtitle: str, sections: Sequence[Section], banner: str = "") -> str:
    """The whole page; `banner` (e.g. a verdict) goes first, before any section."""
    body = "".join(s.render() for s in sections)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style>'
            f'<link rel="icon" href="data:,"></head><body><h1>{escape(title)}</h1>'
            f'<p class="note">{escape(subtitle)}</p>{banner}{body}</body></html>')
