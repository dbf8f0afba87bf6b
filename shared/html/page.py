"""Self-contained HTML pages (the privacy audit, the model card) from jinja2 templates.

One Environment with autoescape on: whatever comes from data (a site name, a run id, a ledger field,
a refusal message) reaches the page as text, never as markup, so the code that fills a template
passes plain values (strings, numbers, lists, dicts) and never marks anything safe. Templates are
package files: `base.html` (the page: style, title, verdict banner, sections) and `parts.html`
(tables, figures, notes) here, and each page's own template in the `templates/` folder beside the
code that fills it, named "<package>:<file>". Pages have no scripts and make no network requests:
plots are embedded PNG data URIs, so a privacy officer can open one offline in any browser.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import matplotlib
from jinja2 import BaseLoader, Environment, PackageLoader, StrictUndefined

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TEMPLATE_FOLDER = "templates"


class PackageTemplates(BaseLoader):
    """Templates from package files: "base.html" is this package's, "spine_fl.a.b:page.html" is the
    `templates/` folder of package spine_fl.a.b (so shared/ needs to know no package that uses it)."""

    def __init__(self) -> None:
        self._loaders: dict[str, PackageLoader] = {}

    def get_source(self, environment: Environment, template: str) -> tuple[str, str | None, Any]:
        package, _, name = template.rpartition(":")
        package = package or __package__
        if package not in self._loaders:
            self._loaders[package] = PackageLoader(package, TEMPLATE_FOLDER)
        return self._loaders[package].get_source(environment, name)


def format_number(value: float | int) -> str:
    """A table's number: integers as they are, others to three decimals (three digits when tiny)."""
    if isinstance(value, int):
        return str(value)
    return f"{value:.3g}" if abs(value) < 1e-3 and value != 0 else f"{value:.3f}"


ENVIRONMENT = Environment(loader=PackageTemplates(), autoescape=True, undefined=StrictUndefined,
                          trim_blocks=True, lstrip_blocks=True)
ENVIRONMENT.filters["number"] = format_number


def render_page(package: str, template: str, **context: Any) -> str:
    """Fill `template` from `package`'s templates folder (it extends base.html: pass `title`,
    `subtitle` and optionally `verdict` = {"level", "reasons"}) with plain data."""
    return ENVIRONMENT.get_template(f"{package}:{template}").render(**context)


def figure_data_uri(fig: plt.Figure) -> str:
    """A matplotlib figure as an embedded PNG (a data: URI for an <img>'s src); closes the figure."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
