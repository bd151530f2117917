"""Griffe extension for the API reference: reads the package's docstrings as they are written.

The package's docstrings follow the Google style as Napoleon reads it: ``Example:`` opens a section of
doctest lines, and ``:class:`` / ``:mod:`` / ``:func:`` roles name other objects. Griffe treats ``Example:``
as an admonition of Markdown text (where ``>>>`` becomes a nested quote) and leaves the roles as they are,
so before a docstring is parsed this extension renames the section to ``Examples:`` and turns each role
into inline code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE_HEADING = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_ROLE = re.compile(r":(?:py:)?(?:class|mod|func|meth|attr|data|obj|exc|const):`(~?)([^`]+)`")


def _role_to_code(match: re.Match[str]) -> str:
    target = match.group(2).strip()
    if match.group(1):  # "~a.b.c" shows only its last part, as Sphinx does
        target = target.rsplit(".", 1)[-1]
    return f"`{target}`"


def normalise(text: str) -> str:
    """Return a docstring with ``Example:`` sections renamed and roles turned into inline code.

    Args:
        text: The docstring as written.

    Returns:
        The text griffe's Google parser and Markdown render as intended.
    """
    return _ROLE.sub(_role_to_code, _EXAMPLE_HEADING.sub(r"\1Examples:", text))


class NapoleonDocstrings(griffe.Extension):
    """Rewrites every docstring when its object is loaded (rewriting twice changes nothing)."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:  # noqa: ARG002
        """Normalise the docstring of a loaded object.

        Args:
            obj: The object griffe has just loaded.
            **kwargs: Further hook arguments, unused.
        """
        if obj.docstring is not None:
            obj.docstring.value = normalise(obj.docstring.value)

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:  # noqa: ARG002
        """Normalise the docstring of a top-level package, which griffe loads without ``on_object``.

        Args:
            pkg: The package griffe has just loaded.
            **kwargs: Further hook arguments, unused.
        """
        self.on_object(obj=pkg)
