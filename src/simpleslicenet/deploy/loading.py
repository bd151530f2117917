"""Loading model files without running code from them: which classes a file may name, and checkpoints.

What a model file can make this package do is limited to what it is meant to say:

* **Checkpoints** are read with ``torch.load(weights_only=True)``: tensors, plain containers and numbers,
  plus the types anomalib allows for its own checkpoints (:func:`anomalib.utils.serialization.anomalib_safe_globals`)
  and the small enums that the accepted model classes declare (``checkpoint_safe_globals()``). A file
  that needs anything else is refused with :class:`ModelFileError`, unless the user opts in with
  anomalib's own convention, the environment variable ``TRUST_REMOTE_CODE=1``.
* **The model class** named in a file's metadata is imported only if it is one of the package's
  registered models (:data:`simpleslicenet.models.registry.MODELS`) or the slice-wise wrapper
  ``simpleslicenet.models.slicewise.<Model>Slices`` of an anomalib image model
  (:func:`accept_package_class`). No other name reaches the import system.
* **Metadata** (class, preprocessing, scoring, validation threshold) is checked against the one schema
  of :mod:`simpleslicenet.model_metadata`.
* **What a model computes** is checked at run time (:func:`check_model_output`): one finite map per slice.
  Exported OpenVINO graphs are read and checked by :mod:`simpleslicenet.deploy.openvino`.

Example:
    >>> from simpleslicenet.deploy.loading import read_checkpoint
    >>> checkpoint = read_checkpoint("model.ckpt")  # doctest: +SKIP
    >>> checkpoint.metadata.class_path  # doctest: +SKIP
    'simpleslicenet.models.simpleslicenet.lightning_model.SimpleSliceNet'
"""

from __future__ import annotations

import functools
import logging
import os
import pickle
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from simpleslicenet.model_metadata import METADATA_KEY, ModelFileError, ModelMetadata, is_dotted_name, parse_metadata
from simpleslicenet.models.registry import MODELS, UnknownModelError, anomalib_image_models, get_model_class, get_spec

__all__ = [
    "ModelFileError",
    "ModelOutputError",
    "LoadedCheckpoint",
    "TRUST_REMOTE_CODE_ENV",
    "trust_remote_code",
    "accept_package_class",
    "allowed_class_name",
    "resolve_model_class",
    "checkpoint_safe_globals",
    "check_model_file",
    "read_checkpoint",
    "load_checkpoint_model",
    "check_model_output",
]

logger = logging.getLogger(__name__)

TRUST_REMOTE_CODE_ENV = "TRUST_REMOTE_CODE"  # anomalib's opt-in for loading pickled code
SLICEWISE_MODULE = "simpleslicenet.models.slicewise"


class ModelOutputError(ModelFileError):
    """A model that produced something other than one finite anomaly map per slice."""


def trust_remote_code() -> bool:
    """Whether the user allowed model files to run code (``TRUST_REMOTE_CODE=1`` or ``true``, as in anomalib)."""
    return os.environ.get(TRUST_REMOTE_CODE_ENV, "0").strip().lower() in {"1", "true"}


# -- model classes -----------------------------------------------------------------------------------


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
    if not is_dotted_name(class_path):
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
    return ModelFileError.at(
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
    name = allowed_class_name(class_path)
    if name is None:
        raise _refuse_class(class_path, source)
    try:
        cls = get_model_class(name)
    except UnknownModelError as error:
        raise ModelFileError.at(source, f"model class {class_path!r}: {error}") from error
    spec = get_spec(name)
    known_paths = {f"{cls.__module__}.{cls.__qualname__}", spec.class_path if spec is not None else ""}
    if class_path not in known_paths:
        raise _refuse_class(class_path, source)
    return cls


def accept_package_class(class_path: object, source: str | os.PathLike) -> None:
    """Refuse a class path that :func:`allowed_class_name` does not accept (the ``accept_class`` of
    :func:`~simpleslicenet.model_metadata.parse_metadata` for every file this package loads).

    Raises:
        ModelFileError: The path names no registered model or anomalib image model wrapper.
    """
    if allowed_class_name(class_path) is None:
        raise _refuse_class(class_path, source)


# -- checkpoints ---------------------------------------------------------------------------------


@functools.cache
def checkpoint_safe_globals() -> tuple[Any, ...]:
    """Types a checkpoint may hold beyond tensors and numbers: what the accepted model classes declare.

    That is the ``checkpoint_safe_globals()`` of every registered model and of every anomalib image
    model (their ``<Model>Slices`` wrappers are accepted too): a handful of anomalib enums.
    """
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


def check_model_file(path: Path) -> None:
    """Refuse a model path that is missing or not a file.

    Raises:
        ModelFileError: Naming the path.
    """
    if not path.is_file():
        raise ModelFileError.at(path, "model file does not exist" if not path.exists() else "model path is not a file")


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
    check_model_file(path)
    ran_code = False
    try:
        with _safe_globals():
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        unsafe = _unsafe_globals(path)
        wanted = f" (it asks for {', '.join(unsafe)})" if unsafe else ""
        if not trust_remote_code():
            raise ModelFileError.at(
                path,
                f"refused: loading this checkpoint would run code stored in it{wanted}. Checkpoints of this "
                f"package never need that; if you trust the file's source, set {TRUST_REMOTE_CODE_ENV}=1 to allow it",
            ) from error
        logger.warning("%s: %s=1 is set; unpickling with code execution allowed%s", path, TRUST_REMOTE_CODE_ENV, wanted)
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)  # nosec B614 - the user opted in
        except Exception as reload_error:  # noqa: BLE001 - torch raises many types for damaged files
            raise ModelFileError.at(
                path, f"not a readable checkpoint ({type(reload_error).__name__}: {reload_error})"
            ) from reload_error
        ran_code = True
    except Exception as error:  # noqa: BLE001 - torch raises many types for foreign or damaged files
        raise ModelFileError.at(path, f"not a readable checkpoint ({type(error).__name__}: {error})") from error
    block = checkpoint.get(METADATA_KEY) if isinstance(checkpoint, dict) else None
    if block is None:
        raise ModelFileError.at(path, f"not a simpleslicenet checkpoint (no '{METADATA_KEY}' entry)")
    metadata = parse_metadata(block, path, accept_package_class)
    return LoadedCheckpoint(path=path, checkpoint=checkpoint, metadata=metadata, ran_code=ran_code)


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
        raise ModelFileError.at(loaded.path, f"cannot rebuild {cls.__name__} from it ({type(error).__name__}: {error})") from error
    model.eval()
    return model, loaded.metadata


# -- model output --------------------------------------------------------------------------------


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
