"""The reports' template environment and the one way a number is written into a page.

Every number a page shows is a ``<span class="num" data-field="..." data-value="...">`` whose
``data-value`` is ``repr(float(value))`` (``"null"`` for a missing value), so a test or a script can read
the exact figures back and compare them with ``scores.json`` or a sidecar; the text beside it is rounded
for reading. In a subject page ``data-field`` is the value's path in the scan's record (``volume_score``,
``clusters.0.peak_mm.2``, ``model.settings.backbone_depth``); numbers the page derives itself start with
``derived.``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

from markupsafe import Markup

from simpleslicenet._version import __version__

__all__ = ["environment", "format_number", "number", "render"]


def format_number(value: float | None, kind: str = "g") -> str:
    """Readable text of a number: ``"p"`` p-value, ``"ml"`` millilitres, ``"mm"``, ``"int"`` or ``"g"`` (4 digits)."""
    if value is None:
        return "–"
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    if kind == "int":
        return f"{value:.0f}"
    if kind == "p":
        return f"{value:.3g}" if value >= 1e-3 or value == 0 else f"{value:.2e}"
    if kind == "ml":
        return f"{value:.2f}"
    if kind == "mm":
        return f"{value:.1f}"
    return f"{value:.4g}"


def number(value: Any, field: str, kind: str = "g") -> Markup:  # noqa: ANN401
    """A number as a ``<span>`` carrying its exact value and its field name (see the module's docstring)."""
    exact = "null" if value is None else repr(float(value))
    text = format_number(None if value is None else float(value), "int" if isinstance(value, bool | int) and kind == "g" else kind)
    return Markup('<span class="num" data-field="{}" data-value="{}">{}</span>').format(field, exact, text)


def _is_number(value: Any) -> bool:  # noqa: ANN401
    return isinstance(value, int | float) and not isinstance(value, bool)


def _tree(value: Any, field: str) -> Markup:  # noqa: ANN401
    """A nested record as nested definition lists, its numbers as :func:`number` spans."""
    if isinstance(value, Mapping):
        if not value:
            return Markup("<em>none</em>")
        items = Markup("").join(
            Markup("<dt>{}</dt><dd>{}</dd>").format(key, _tree(item, f"{field}.{key}" if field else str(key)))
            for key, item in value.items()
        )
        return Markup('<dl class="tree">{}</dl>').format(items)
    if isinstance(value, list | tuple):
        if value and all(_is_number(v) for v in value) and len(value) > 12:
            return Markup("<span>{} numbers</span>").format(len(value))  # long series are plotted, not listed
        return Markup(", ").join(_tree(item, f"{field}.{i}") for i, item in enumerate(value)) or Markup("[]")
    if _is_number(value):
        return number(value, field)
    if value is None:
        return Markup("<em>none</em>")
    return Markup('<span class="text">{}</span>').format(value)


@functools.cache
def environment():  # noqa: ANN201
    """The Jinja2 environment of the templates shipped in ``simpleslicenet/reports/templates``."""
    from jinja2 import Environment, PackageLoader, StrictUndefined

    env = Environment(
        loader=PackageLoader("simpleslicenet.reports", "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals.update(number=number, tree=_tree, fmt=format_number, repr_value=lambda v: repr(float(v)), version=__version__)
    return env


def render(template: str, **context: Any) -> str:  # noqa: ANN401
    """Render one of the shipped templates."""
    return environment().get_template(template).render(**context)

