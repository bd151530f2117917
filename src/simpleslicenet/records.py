"""Settings that travel with a model: frozen dataclasses stored in checkpoints and exports as plain dicts."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any, Self

__all__ = ["SettingsRecord"]


class SettingsRecord:
    """Mix into a frozen dataclass: :meth:`to_dict` for storing, :meth:`from_dict` that validates on the way back."""

    def to_dict(self) -> dict[str, Any]:
        """Plain form (tuples become lists), as stored in checkpoints and exported models."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> Self:
        """Rebuild from :meth:`to_dict`'s output; the dataclass's own checks run as on construction.

        Raises:
            ValueError: Not a mapping, unknown keys, or invalid values.
        """
        if not isinstance(record, dict):
            msg = f"{cls.__name__} record must be a mapping, got {type(record).__name__}"
            raise ValueError(msg)
        unknown = set(record) - {f.name for f in fields(cls)}
        if unknown:
            msg = f"{cls.__name__} record has unknown keys {sorted(unknown)}"
            raise ValueError(msg)
        return cls(**record)
