"""The metadata block every simpleslicenet model file carries, and its one validation.

A checkpoint stores the block under :data:`METADATA_KEY`; an exported OpenVINO graph stores it as JSON
text in its runtime info under the same key. It says which model class made the file, how scans were
prepared in training (:class:`~simpleslicenet.data.volume.VolumePreprocessing`), how volume scores are
taken (:class:`~simpleslicenet.models.scoring.VolumeScoring`) and the Dice threshold chosen on
validation. Models write it (:class:`ModelMetadata`), checkpoints are restored from it and the
deployed inferencer reads it back through :func:`parse_metadata` / :func:`parse_metadata_json`, which
check it against one schema: known keys only, the right types, finite numbers, and a model grid within
the voxel limit (:func:`simpleslicenet.data.nifti.check_voxel_count`). Which model classes a file may
name is the caller's decision (``accept_class``): safe loading accepts only the package's own
(:func:`simpleslicenet.deploy.loading.allowed_class_name`).

Example:
    >>> from simpleslicenet.models.scoring import VolumeScoring
    >>> block = ModelMetadata("my.models.Model", None, VolumeScoring(), 0.4).to_dict()
    >>> parse_metadata(block, "model.ckpt").dice_threshold
    0.4
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self

from simpleslicenet.data.nifti import VolumeError, check_voxel_count
from simpleslicenet.data.volume import VolumePreprocessing
from simpleslicenet.models.scoring import VolumeScoring

__all__ = [
    "METADATA_KEY",
    "METADATA_FIELDS",
    "MAX_METADATA_CHARS",
    "MAX_CLASS_PATH_CHARS",
    "ModelFileError",
    "ModelMetadata",
    "ClassRule",
    "is_dotted_name",
    "parse_metadata",
    "parse_metadata_json",
]

# Key of the metadata block in checkpoints and in exported models' runtime info.
METADATA_KEY = "simpleslicenet"
METADATA_FIELDS = ("class_path", "preprocessing", "scoring", "dice_threshold")
# Exported metadata is a few hundred characters; anything far larger is not ours.
MAX_METADATA_CHARS = 65_536
MAX_CLASS_PATH_CHARS = 200
_DOTTED_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+")
# Called with a file's class path and the file; raises ModelFileError for a class the caller refuses.
ClassRule = Callable[[object, str | os.PathLike], None]


class ModelFileError(ValueError):
    """A model file that cannot be used for volume inference (the message names the file)."""

    @classmethod
    def at(cls, source: str | os.PathLike, problem: str) -> Self:
        """The error for ``source``: ``"<source>: <problem>"``."""
        return cls(f"{source}: {problem}")


def _invalid(source: str | os.PathLike, problem: str) -> ModelFileError:
    return ModelFileError.at(source, f"invalid simpleslicenet metadata ({problem})")


def is_dotted_name(value: object) -> bool:
    """Whether ``value`` reads as a dotted class path (``package.module.Class``) of reasonable length."""
    return isinstance(value, str) and len(value) <= MAX_CLASS_PATH_CHARS and _DOTTED_NAME.fullmatch(value) is not None


def _finite_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class ModelMetadata:
    """The package's metadata block of a checkpoint or exported model.

    Args:
        class_path: Dotted path of the model class.
        preprocessing: How scans were prepared in training; ``None`` if the model never saw a
            volume datamodule.
        scoring: How volume scores are taken.
        dice_threshold: Threshold chosen on validation, or ``None``.
    """

    class_path: str
    preprocessing: VolumePreprocessing | None
    scoring: VolumeScoring
    dice_threshold: float | None

    def to_dict(self) -> dict[str, Any]:
        """Plain form, as stored in checkpoints and (as JSON) in exported graphs."""
        return {
            "class_path": self.class_path,
            "preprocessing": self.preprocessing.to_dict() if self.preprocessing is not None else None,
            "scoring": self.scoring.to_dict(),
            "dice_threshold": self.dice_threshold,
        }

    def to_json(self) -> str:
        """Strict JSON text of :meth:`to_dict`, as stored in exported graphs."""
        return json.dumps(self.to_dict(), allow_nan=False)


def _check_preprocessing_record(record: dict[str, Any], source: str | os.PathLike) -> None:
    shape = record.get("target_shape")
    if shape is not None:
        if (
            not isinstance(shape, list | tuple)
            or len(shape) != 3
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape)
        ):
            raise _invalid(source, f"target_shape must be three whole numbers, got {shape!r}")
        try:
            check_voxel_count(shape, None, "model grid")
        except VolumeError as error:
            raise _invalid(source, str(error)) from error
    spacing = record.get("spacing_mm")
    if spacing is not None and not (_finite_number(spacing) and spacing > 0):
        raise _invalid(source, f"spacing_mm must be a positive finite number, got {spacing!r}")
    for key in ("intensity", "brain_mask", "modality"):
        value = record.get(key)
        if value is not None and not isinstance(value, str):
            raise _invalid(source, f"{key} must be text, got {value!r}")


def _preprocessing(record: object, source: str | os.PathLike) -> VolumePreprocessing | None:
    if record is None:
        return None
    if not isinstance(record, dict):
        msg = f"preprocessing must be a mapping, got {type(record).__name__}"
        raise ValueError(msg)
    _check_preprocessing_record(record, source)
    return VolumePreprocessing.from_dict(record)


def _scoring(record: object) -> VolumeScoring:
    if record is not None and not isinstance(record, dict):
        msg = f"scoring must be a mapping, got {type(record).__name__}"
        raise ValueError(msg)
    return VolumeScoring.from_dict(record or {})


def parse_metadata(record: object, source: str | os.PathLike, accept_class: ClassRule | None = None) -> ModelMetadata:
    """Validate a metadata block (a mapping with :data:`METADATA_FIELDS`) against the schema.

    Args:
        record: The block as read from the file.
        source: The file (named in errors).
        accept_class: Called with the stored class path (and ``source``) before anything else of the
            block is read; it raises :class:`ModelFileError` for a class the caller does not accept.
            ``None``: any class path (the caller restores a model it already has).

    Raises:
        ModelFileError: Not a mapping, unknown keys, a class path that is not accepted, or invalid
            preprocessing, scoring or threshold values.
    """
    if not isinstance(record, dict):
        raise _invalid(source, f"expected a mapping, got {type(record).__name__}")
    unknown = sorted(str(key) for key in record if key not in METADATA_FIELDS)
    if unknown:
        raise _invalid(source, f"unknown keys {unknown}; known: {list(METADATA_FIELDS)}")
    class_path = record.get("class_path")
    if accept_class is not None:
        accept_class(class_path, source)
    if not isinstance(class_path, str) or not 0 < len(class_path) <= MAX_CLASS_PATH_CHARS:
        raise _invalid(source, f"class_path must be the model class's path, got {class_path!r}")
    threshold = record.get("dice_threshold")
    if threshold is not None and not _finite_number(threshold):
        raise _invalid(source, f"dice_threshold must be a finite number, got {threshold!r}")
    try:
        preprocessing = _preprocessing(record.get("preprocessing"), source)
        scoring = _scoring(record.get("scoring"))
    except ModelFileError:
        raise
    except (TypeError, ValueError, OverflowError) as error:
        raise _invalid(source, str(error)) from error
    return ModelMetadata(
        class_path=class_path,
        preprocessing=preprocessing,
        scoring=scoring,
        dice_threshold=None if threshold is None else float(threshold),
    )


def _refuse_constant(name: str) -> float:
    msg = f"{name} is not a valid number here"
    raise ValueError(msg)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        msg = f"number {text} does not fit a 64-bit float"
        raise ValueError(msg)
    return value


def parse_metadata_json(
    text: object, source: str | os.PathLike, accept_class: ClassRule | None = None
) -> ModelMetadata:
    """Parse and validate the metadata text of an exported model (strict JSON: no NaN or Infinity).

    Args:
        text: The JSON text stored in the model.
        source: The file (named in errors).
        accept_class: As for :func:`parse_metadata`.

    Raises:
        ModelFileError: Not text, too long, not strict JSON, or refused by :func:`parse_metadata`.
    """
    if not isinstance(text, str):
        raise _invalid(source, f"expected JSON text, got {type(text).__name__}")
    if len(text) > MAX_METADATA_CHARS:
        raise _invalid(source, f"{len(text):,} characters; ours are far shorter")
    try:
        record = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as error:
        raise _invalid(source, f"not valid JSON: {error}") from error
    return parse_metadata(record, source, accept_class)
