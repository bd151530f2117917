"""The one check of a setting that takes one of a few named values."""

from __future__ import annotations

from collections.abc import Collection

__all__ = ["check_choice"]


def check_choice(setting: str, value: object, choices: Collection[object]) -> None:
    """Raise ``ValueError`` naming ``setting``, the value given and the accepted ones, unless ``value`` is one of ``choices``."""
    if value not in choices:
        msg = f"unknown {setting} {value!r}: use one of {tuple(choices)}"
        raise ValueError(msg)
