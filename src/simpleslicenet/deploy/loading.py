"""Loading model files without running code from them: checkpoints, exported OpenVINO models, their metadata.

What a model file can make this package do is limited to what it is meant to say:

* **Checkpoints** are read with ``torch.load(weights_only=True)``: tensors, plain containers and numbers,
  plus the types anomalib allows for its own checkpoints (:func:`anomalib.utils.serialization.anomalib_safe_globals`)
  and the small enums that the accepted model classes declare (``checkpoint_safe_globals()``). A file
  that needs anything else is refused with :class:`ModelFileError`, unless the user opts in with
  anomalib's own convention, the environment variable ``TRUST_REMOTE_CODE=1``.
* **The model class** named in a file's metadata is imported only if it is one of the package's
  registered models (:data:`simpleslicenet.models.registry.MODELS`) or the slice-wise wrapper
  ``simpleslicenet.models.slicewise.<Model>Slices`` of an anomalib image model. No other name reaches
  the import system.
* **Metadata** (class, preprocessing, scoring, validation threshold) is checked against a schema:
  known keys only, the right types, finite numbers, and a model grid within the voxel limit
  (:func:`simpleslicenet.data.nifti.voxel_limit`).
* **Exported OpenVINO graphs** must take one slice stack ``[D, 3, H, W]`` and give an ``anomaly_map``;
  what they compute is checked at run time (:func:`check_model_output`): one finite map per slice.

Example:
    >>> from simpleslicenet.deploy.loading import read_checkpoint
    >>> checkpoint = read_checkpoint("model.ckpt")  # doctest: +SKIP
    >>> checkpoint.metadata.class_path  # doctest: +SKIP
    'simpleslicenet.models.simpleslicenet.lightning_model.SimpleSliceNet'
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import pickle
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from simpleslicenet.data.nifti import VolumeError, check_voxel_count
from simpleslicenet.data.volume import VolumePreprocessing
from simpleslicenet.models.scoring import VolumeScoring

__all__ = [
    "ModelFileError",
    "ModelOutputError",
    "ModelMetadata",
    "LoadedCheckpoint",
    "OpenVINOModel",
    "TRUST_REMOTE_CODE_ENV",
    "METADATA_FIELDS",
    "trust_remote_code",
    "parse_metadata",
    "parse_metadata_json",
    "allowed_class_name",
    "resolve_model_class",
    "checkpoint_safe_globals",
    "read_checkpoint",
    "load_checkpoint_model",
    "load_openvino",
    "check_model_output",
]

logger = logging.getLogger(__name__)

TRUST_REMOTE_CODE_ENV = "TRUST_REMOTE_CODE"  # anomalib's opt-in for loading pickled code
METADATA_FIELDS = ("class_path", "preprocessing", "scoring", "dice_threshold")
# Exported metadata is a few hundred characters; anything far larger is not ours.
MAX_METADATA_CHARS = 65_536
SLICEWISE_MODULE = "simpleslicenet.models.slicewise"
_DOTTED_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+")


class ModelFileError(ValueError):
    """A model file that cannot be used for volume inference (the message names the file)."""


class ModelOutputError(ModelFileError):
    """A model that produced something other than one finite anomaly map per slice."""


def _fail(source: str | os.PathLike, problem: str) -> ModelFileError:
    return ModelFileError(f"{source}: {problem}")


def trust_remote_code() -> bool:
    """Whether the user allowed model files to run code (``TRUST_REMOTE_CODE=1`` or ``true``, as in anomalib)."""
    return os.environ.get(TRUST_REMOTE_CODE_ENV, "0").strip().lower() in {"1", "true"}


# -- metadata ------------------------------------------------------------------------------------


def allowed_class_name(class_path: object) -> str | None:
    """Registry name of a class path the package accepts from a file, without importing anything.

    Accepted: a registered model by its registry path or by the module that defines it
    (``simpleslicenet.models.simpleslicenet.lightning_model.SimpleSliceNet``), and
    ``simpleslicenet.models.slicewise.<Model>Slices``.

    Args:
        class_path: The value stored in a file.

    Returns:
        The class name to look up with :func:`~simpleslicenet.models.registry.get_model_class`, or
        ``None`` if the path is not acceptable.
    """
    from simpleslicenet.models.registry import MODELS

    if not isinstance(class_path, str) or len(class_path) > 200 or not _DOTTED_NAME.fullmatch(class_path):
        return None
    module, _, name = class_path.rpartition(".")
    spec = MODELS.get(name)
    if spec is not None:
        registered_module = spec.class_path.rpartition(".")[0]
        if module == registered_module or module.startswith(registered_module + "."):
            return name
        return None
    if module == SLICEWISE_MODULE and name.endswith("Slices") and len(name) > len("Slices"):
        return name
    return None


def _refuse_class(class_path: object, source: str | os.PathLike) -> ModelFileError:
    from simpleslicenet.models.registry import MODELS

    return _fail(
        source,
        f"model class {class_path!r} is not one of the package's models ({', '.join(MODELS)}, or "
        f"{SLICEWISE_MODULE}.<AnomalibImageModel>Slices); refusing to import it",
    )


def resolve_model_class(class_path: object, source: str | os.PathLike) -> type:
    """The model class a file names, imported only if :func:`allowed_class_name` accepts it.

    Args:
        class_path: The value stored in the file.
        source: The file (named in errors).

    Raises:
        ModelFileError: The path names no registered model or anomalib image model wrapper.
    """
    from simpleslicenet.models.registry import (
        UnknownModelError,
        get_model_class,
        get_spec,
    )

    name = allowed_class_name(class_path)
    if name is None:
        raise _refuse_class(class_path, source)
    try:
        cls = get_model_class(name)
    except UnknownModelError as error:
        raise _fail(source, f"model class {class_path!r}: {error}") from error
    spec = get_spec(name)
    known_paths = {f"{cls.__module__}.{cls.__qualname__}", spec.class_path if spec is not None else ""}
    if class_path not in known_paths:
        raise _refuse_class(class_path, source)
    return cls


def _finite_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class ModelMetadata:
    """The package's metadata block of a checkpoint or exported model, validated.

    Args:
        class_path: Dotted path of the model class (an accepted one, see :func:`allowed_class_name`).
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
        """Plain form, as the models write it (``VolumeModelMixin.metadata()``)."""
        return {
            "class_path": self.class_path,
            "preprocessing": self.preprocessing.to_dict() if self.preprocessing is not None else None,
            "scoring": self.scoring.to_dict(),
            "dice_threshold": self.dice_threshold,
        }


def _check_preprocessing_record(record: dict[str, Any], source: str | os.PathLike) -> None:
    shape = record.get("target_shape")
    if shape is not None:
        if (
            not isinstance(shape, list | tuple)
            or len(shape) != 3
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape)
        ):
            raise _fail(
                source, f"invalid simpleslicenet metadata (target_shape must be three whole numbers, got {shape!r})"
            )
        try:
            check_voxel_count(shape, None, "model grid")
        except VolumeError as error:
            raise _fail(source, f"invalid simpleslicenet metadata ({error})") from error
    spacing = record.get("spacing_mm")
    if spacing is not None and not (_finite_number(spacing) and spacing > 0):
        msg = f"invalid simpleslicenet metadata (spacing_mm must be a positive finite number, got {spacing!r})"
        raise _fail(source, msg)
    for key in ("intensity", "brain_mask", "modality"):
        value = record.get(key)
        if value is not None and not isinstance(value, str):
            raise _fail(source, f"invalid simpleslicenet metadata ({key} must be text, got {value!r})")


def parse_metadata(record: object, source: str | os.PathLike) -> ModelMetadata:
    """Validate a metadata block (a mapping with :data:`METADATA_FIELDS`) against the schema.

    Args:
        record: The block as read from the file.
        source: The file (named in errors).

    Raises:
        ModelFileError: Not a mapping, unknown or missing ``class_path``, a class that is not accepted,
            or invalid preprocessing, scoring or threshold values.
    """
    if not isinstance(record, dict):
        raise _fail(source, f"invalid simpleslicenet metadata (expected a mapping, got {type(record).__name__})")
    unknown = sorted(str(key) for key in record if key not in METADATA_FIELDS)
    if unknown:
        raise _fail(source, f"invalid simpleslicenet metadata (unknown keys {unknown}; known: {list(METADATA_FIELDS)})")
    class_path = record.get("class_path")
    if allowed_class_name(class_path) is None:
        raise _refuse_class(class_path, source)
    preprocessing_record = record.get("preprocessing")
    scoring_record = record.get("scoring")
    threshold = record.get("dice_threshold")
    if threshold is not None and not _finite_number(threshold):
        raise _fail(
            source, f"invalid simpleslicenet metadata (dice_threshold must be a finite number, got {threshold!r})"
        )
    try:
        if preprocessing_record is None:
            preprocessing = None
        elif isinstance(preprocessing_record, dict):
            _check_preprocessing_record(preprocessing_record, source)
            preprocessing = VolumePreprocessing.from_dict(preprocessing_record)
        else:
            msg = f"preprocessing must be a mapping, got {type(preprocessing_record).__name__}"
            raise ValueError(msg)
        if scoring_record is not None and not isinstance(scoring_record, dict):
            msg = f"scoring must be a mapping, got {type(scoring_record).__name__}"
            raise ValueError(msg)
        scoring = VolumeScoring.from_dict(scoring_record or {})
    except ModelFileError:
        raise
    except (TypeError, ValueError, OverflowError) as error:
        raise _fail(source, f"invalid simpleslicenet metadata ({error})") from error
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


def parse_metadata_json(text: object, source: str | os.PathLike) -> ModelMetadata:
    """Parse and validate the metadata of an exported model (strict JSON: no NaN or Infinity).

    Args:
        text: The JSON text stored in the model.
        source: The file (named in errors).

    Raises:
        ModelFileError: Not text, too long, not strict JSON, or refused by :func:`parse_metadata`.
    """
    if not isinstance(text, str):
        raise _fail(source, f"invalid simpleslicenet metadata (expected JSON text, got {type(text).__name__})")
    if len(text) > MAX_METADATA_CHARS:
        raise _fail(source, f"invalid simpleslicenet metadata ({len(text):,} characters; ours are far shorter)")
    try:
        record = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as error:
        raise _fail(source, f"invalid simpleslicenet metadata (not valid JSON: {error})") from error
    return parse_metadata(record, source)


# -- checkpoints ---------------------------------------------------------------------------------


@functools.cache
def checkpoint_safe_globals() -> tuple[Any, ...]:
    """Types a checkpoint may hold beyond tensors and numbers: what the accepted model classes declare.

    That is the ``checkpoint_safe_globals()`` of every registered model and of every anomalib image
    model (their ``<Model>Slices`` wrappers are accepted too): a handful of anomalib enums.
    """
    from simpleslicenet.models.registry import MODELS, anomalib_image_models, get_model_class

    classes = [get_model_class(name) for name in MODELS] + list(anomalib_image_models().values())
    extras: list[Any] = []
    for cls in classes:
        extras.extend(item for item in cls.checkpoint_safe_globals() if item not in extras)
    return tuple(extras)


@contextmanager
def _safe_globals() -> Iterator[None]:
    from anomalib.utils.serialization import anomalib_safe_globals

    with anomalib_safe_globals(extra=checkpoint_safe_globals()):
        yield


def _unsafe_globals(path: Path) -> list[str]:
    import torch

    try:
        with _safe_globals():
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - only used to explain a refusal; a legacy file cannot be listed
        return []


@dataclass
class LoadedCheckpoint:
    """A checkpoint read by :func:`read_checkpoint`.

    Args:
        path: The file.
        checkpoint: Its contents.
        metadata: Its validated metadata block.
        ran_code: ``True`` if it was unpickled with code execution allowed (``TRUST_REMOTE_CODE=1``).
    """

    path: Path
    checkpoint: dict[str, Any]
    metadata: ModelMetadata
    ran_code: bool


def _check_model_file(path: Path) -> None:
    if not path.is_file():
        raise _fail(path, "model file does not exist" if not path.exists() else "model path is not a file")


def read_checkpoint(path: str | os.PathLike) -> LoadedCheckpoint:
    """Read a Lightning checkpoint without running code from it, and validate its metadata.

    Args:
        path: The ``.ckpt`` file.

    Raises:
        ModelFileError: Missing or unreadable file; a file that would need code to be unpickled (the
            message lists what it asks for) while ``TRUST_REMOTE_CODE`` is not set; no or invalid
            simpleslicenet metadata.
    """
    import torch

    path = Path(path)
    _check_model_file(path)
    ran_code = False
    try:
        with _safe_globals():
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        unsafe = _unsafe_globals(path)
        wanted = f" (it asks for {', '.join(unsafe)})" if unsafe else ""
        if not trust_remote_code():
            raise _fail(
                path,
                f"refused: loading this checkpoint would run code stored in it{wanted}. Checkpoints of this "
                f"package never need that; if you trust the file's source, set {TRUST_REMOTE_CODE_ENV}=1 to allow it",
            ) from error
        logger.warning("%s: %s=1 is set; unpickling with code execution allowed%s", path, TRUST_REMOTE_CODE_ENV, wanted)
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)  # nosec B614 - the user opted in
        except Exception as reload_error:  # noqa: BLE001 - torch raises many types for damaged files
            raise _fail(
                path, f"not a readable checkpoint ({type(reload_error).__name__}: {reload_error})"
            ) from reload_error
        ran_code = True
    except Exception as error:  # noqa: BLE001 - torch raises many types for foreign or damaged files
        raise _fail(path, f"not a readable checkpoint ({type(error).__name__}: {error})") from error
    from simpleslicenet.models.volume_model import METADATA_KEY

    block = checkpoint.get(METADATA_KEY) if isinstance(checkpoint, dict) else None
    if block is None:
        raise _fail(path, f"not a simpleslicenet checkpoint (no '{METADATA_KEY}' entry)")
    return LoadedCheckpoint(path=path, checkpoint=checkpoint, metadata=parse_metadata(block, path), ran_code=ran_code)


def load_checkpoint_model(path: str | os.PathLike, device: str = "cpu") -> tuple[Any, ModelMetadata]:
    """The model of a checkpoint, in eval mode on ``device``, loaded as :func:`read_checkpoint` allows.

    Args:
        path: The ``.ckpt`` file.
        device: Torch device.

    Returns:
        The model and its validated metadata.

    Raises:
        ModelFileError: Everything :func:`read_checkpoint` refuses, a class that is not accepted, or a
            checkpoint that does not rebuild into its model.
    """
    import torch

    loaded = read_checkpoint(path)
    cls = resolve_model_class(loaded.metadata.class_path, loaded.path)
    try:
        with _safe_globals():
            model = cls.load_from_checkpoint(
                loaded.path, map_location=torch.device(device), weights_only=not loaded.ran_code
            )
    except Exception as error:  # noqa: BLE001 - Lightning and the model raise many types for mismatches
        raise _fail(loaded.path, f"cannot rebuild {cls.__name__} from it ({type(error).__name__}: {error})") from error
    model.eval()
    return model, loaded.metadata


# -- OpenVINO ------------------------------------------------------------------------------------


@dataclass
class OpenVINOModel:
    """An exported graph, checked and compiled.

    Args:
        compiled: The compiled model.
        output_names: Names of its outputs, in order.
        metadata: Its validated metadata.
    """

    compiled: Any
    output_names: list[str]
    metadata: ModelMetadata


def _check_graph(model: Any, path: Path, metadata: ModelMetadata) -> None:  # noqa: ANN401 - an openvino.Model
    """The graph takes one slice stack ``[D, 3, H, W]`` (any ``D``, the training slice size) and gives a map."""
    inputs, outputs = model.inputs, model.outputs
    if len(inputs) != 1:
        raise _fail(path, f"expected a graph with one input (a slice stack [D, 3, H, W]), it has {len(inputs)}")
    shape = inputs[0].get_partial_shape()
    if shape.rank.is_dynamic or shape.rank.get_length() != 4 or shape[1].is_dynamic or shape[1].get_length() != 3:
        raise _fail(path, f"expected a graph input of shape [D, 3, H, W], it takes {shape}")
    if not shape[0].is_dynamic:
        raise _fail(
            path, f"expected a graph with a dynamic number of slices (as exported by this package), it takes {shape}"
        )
    grid = metadata.preprocessing.target_shape if metadata.preprocessing is not None else None
    if grid is not None:
        expected = (grid[1], grid[0])  # the grid is (x, y, z); slices are [H = y, W = x]
        for axis, size in zip((2, 3), expected, strict=True):
            if shape[axis].is_static and shape[axis].get_length() != size:
                raise _fail(path, f"graph takes slices of {shape}, but its metadata says the model grid is {grid}")
    if not any("anomaly_map" in output.get_names() for output in outputs):
        names = sorted(name for output in outputs for name in output.get_names())
        raise _fail(path, f"graph has no 'anomaly_map' output (its outputs: {names})")


def load_openvino(path: str | os.PathLike, device: str = "CPU", precision: str = "f32") -> OpenVINOModel:
    """Read, check and compile an exported model (``model.xml`` beside its ``model.bin``).

    Args:
        path: The ``.xml`` file.
        device: OpenVINO device.
        precision: ``"f32"`` or ``"bf16"``.

    Raises:
        ModelFileError: Unreadable graph, missing or invalid metadata, a graph that does not take a slice
            stack or gives no anomaly map, or a graph the device cannot compile.
    """
    import openvino as ov

    from simpleslicenet.models.volume_model import METADATA_KEY

    path = Path(path)
    _check_model_file(path)
    core = ov.Core()
    try:
        model = core.read_model(path)
    except Exception as error:  # noqa: BLE001 - OpenVINO raises RuntimeError and others for damaged files
        raise _fail(path, f"not a readable OpenVINO model ({type(error).__name__}: {error})") from error
    if not model.has_rt_info([METADATA_KEY]):
        raise _fail(
            path,
            f"not an exported simpleslicenet model (no '{METADATA_KEY}' metadata); export it with "
            "`simpleslicenet export` or `anomalib export` from a simpleslicenet checkpoint",
        )
    try:
        text = model.get_rt_info([METADATA_KEY]).astype(str)
    except Exception as error:  # noqa: BLE001 - a non-text entry raises inside OpenVINO
        raise _fail(path, f"invalid simpleslicenet metadata (not text: {error})") from error
    metadata = parse_metadata_json(text, path)
    _check_graph(model, path, metadata)
    try:
        compiled = core.compile_model(model, device.upper(), {"INFERENCE_PRECISION_HINT": precision})
    except Exception as error:  # noqa: BLE001 - OpenVINO raises RuntimeError and others
        raise _fail(path, f"cannot compile the model for {device} ({type(error).__name__}: {error})") from error
    output_names = [output.get_any_name() for output in compiled.outputs]
    return OpenVINOModel(compiled=compiled, output_names=output_names, metadata=metadata)


def check_model_output(anomaly_map: np.ndarray, depth: int, source: str | os.PathLike) -> None:
    """Refuse a raw map that is not one finite map per input slice.

    Args:
        anomaly_map: The model's raw output, ``[D, h, w]`` or ``[D, 1, h, w]``.
        depth: Number of slices given to the model.
        source: The model file (named in the error).

    Raises:
        ModelOutputError: Wrong shape, or NaN / infinite scores.
    """
    shape: Sequence[int] = tuple(anomaly_map.shape)
    if not (len(shape) == 3 or (len(shape) == 4 and shape[1] == 1)) or shape[0] != depth or 0 in shape:
        msg = (
            f"{source}: model gave an anomaly map of shape {tuple(shape)} for {depth} slices; expected [{depth}, h, w]"
        )
        raise ModelOutputError(msg)
    finite = np.isfinite(anomaly_map)
    if not finite.all():
        bad = int(finite.size - np.count_nonzero(finite))
        msg = f"{source}: model gave {bad:,} NaN or infinite scores out of {finite.size:,}; its output cannot be used"
        raise ModelOutputError(msg)
