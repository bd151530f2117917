"""The one table of every model the sweep and the command line can run.

Each entry gives the class (as a dotted path, imported only when asked for, so the table is cheap to
read), its configuration file (shipped inside the package, so it exists in a wheel too) and a line of
description. Only models that detect lesions from the weights available offline are in the table
(a test trains each on the phantom); the configuration's ``init_args`` are the model's defaults for :func:`create_model` and
the sweep; the anomalib CLI reads the same file (``anomalib train --config``). Any other anomalib image
model is reachable by name too: ``"Stfpm"`` or ``"StfpmSlices"`` resolve to its slice-wise wrapper
(:func:`~simpleslicenet.models.slicewise.slicewise`).

Example:
    >>> from simpleslicenet.models.registry import create_model, list_models
    >>> "PatchcoreSlices" in list_models()
    True
    >>> model = create_model("Padim", backbone_weights="random")  # doctest: +SKIP
    >>> type(model).__name__  # doctest: +SKIP
    'PadimSlices'
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from pathlib import Path

    from anomalib.models.components import AnomalibModule

__all__ = [
    "ModelSpec",
    "MODELS",
    "UnknownModelError",
    "list_models",
    "get_spec",
    "get_model_class",
    "create_model",
    "config_path",
    "model_defaults",
    "anomalib_image_models",
    "packaged_config",
    "config_init_args",
]


class UnknownModelError(KeyError):
    """A model name that is neither registered nor an anomalib image model."""

    def __str__(self) -> str:
        return str(self.args[0])


# The table is read at interpreter start-up (the anomalib hook imports this package), so this module
# imports nothing costly at its top: paths and resources load inside the functions that need them.
class ModelSpec(NamedTuple):
    """How to build one registered model.

    Args:
        name: Registry name (the class name).
        class_path: Dotted path of the :class:`~anomalib.models.components.AnomalibModule` subclass.
        config: Name of its configuration file in the package's ``configs/model/``.
        description: One line for listings and reports.
    """

    name: str
    class_path: str
    config: str
    description: str


def _spec(name: str, module: str, config: str, description: str) -> ModelSpec:
    return ModelSpec(name, f"{module}.{name}", config, description)


_SLICEWISE = "simpleslicenet.models.slicewise"

MODELS: Mapping[str, ModelSpec] = MappingProxyType({
    spec.name: spec
    for spec in (
        _spec(
            "SimpleSliceNet",
            "simpleslicenet.models.simpleslicenet",
            "simpleslicenet.yaml",
            "2D backbone features pooled over neighbouring slices, conditional normalizing flow (the flagship)",
        ),
        _spec(
            "PatchcoreSlices",
            _SLICEWISE,
            "patchcore_slices.yaml",
            "PatchCore memory bank of slice features, nearest-neighbour distance per location",
        ),
        _spec(
            "CflowSlices",
            _SLICEWISE,
            "cflow_slices.yaml",
            "CFLOW-AD conditional normalizing flows on slice features",
        ),
        _spec(
            "PadimSlices",
            _SLICEWISE,
            "padim_slices.yaml",
            "PaDiM: one Gaussian of slice features per location",
        ),
        _spec(
            "FastflowSlices",
            _SLICEWISE,
            "fastflow_slices.yaml",
            "FastFlow 2D normalizing flow on slice features (ResNet-18, random init: no offline weights)",
        ),
        _spec(
            "AE3D",
            "simpleslicenet.models.ae3d",
            "ae3d.yaml",
            "3D convolutional autoencoder, smoothed reconstruction error inside the brain",
        ),
    )
})


def _normalise(name: str) -> str:
    """``"patchcore_slices"``, ``"Patchcore-Slices"`` and ``"PatchcoreSlices"`` compare equal."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def list_models() -> list[str]:
    """Names of the registered models, in registry order."""
    return list(MODELS)


def get_spec(name: str) -> ModelSpec | None:
    """The registered spec for ``name`` (any spelling, with or without the ``Slices`` suffix), else ``None``."""
    if name in MODELS:
        return MODELS[name]
    wanted = _normalise(name)
    for spec in MODELS.values():
        key = _normalise(spec.name)
        if wanted in {key, key.removesuffix("slices")}:
            return spec
    return None


def _import(class_path: str) -> type:
    module_name, _, class_name = class_path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        msg = f"model class {class_path!r} cannot be imported: {error}"
        raise UnknownModelError(msg) from error
    try:
        return getattr(module, class_name)
    except AttributeError as error:
        msg = f"module {module_name!r} has no model class {class_name!r}"
        raise UnknownModelError(msg) from error


def anomalib_image_models() -> dict[str, type[AnomalibModule]]:
    """anomalib's own image model classes by name (the ones :func:`slicewise` can wrap)."""
    import anomalib.models  # noqa: PLC0415
    from anomalib.models.components import AnomalibModule  # noqa: PLC0415

    found = {}
    for attribute in dir(anomalib.models):
        candidate = getattr(anomalib.models, attribute)
        if (
            isinstance(candidate, type)
            and issubclass(candidate, AnomalibModule)
            and candidate.__module__.startswith("anomalib.models.image")
        ):
            found[attribute] = candidate
    return found


def _anomalib_image_model(name: str) -> type | None:
    wanted = _normalise(name.removesuffix("Slices"))
    return next((cls for attribute, cls in anomalib_image_models().items() if _normalise(attribute) == wanted), None)


def get_model_class(name: str) -> type[AnomalibModule]:
    """Class for a registered name, a dotted class path, or any anomalib image model name.

    Args:
        name: ``"SimpleSliceNet"``, ``"AE3D"``, ``"PatchcoreSlices"``, ``"Patchcore"``, ``"Stfpm"``,
            ``"StfpmSlices"``, ``"my.package.MyModel"``… Anomalib image models come back wrapped for
            volumes.

    Raises:
        UnknownModelError: If nothing of that name exists.
    """
    spec = get_spec(name)
    if spec is not None:
        return _import(spec.class_path)
    if "." in name:
        cls = _import(name)
    else:
        base = _anomalib_image_model(name)
        if base is None:
            msg = (
                f"unknown model {name!r}: registered models are {', '.join(MODELS)}; "
                "any anomalib image model name (e.g. 'Stfpm') also works"
            )
            raise UnknownModelError(msg)
        from simpleslicenet.models.slicewise import slicewise  # noqa: PLC0415

        cls = slicewise(base)
    from anomalib.models.components import AnomalibModule  # noqa: PLC0415

    if not (isinstance(cls, type) and issubclass(cls, AnomalibModule)):
        msg = f"{name!r} is not an anomalib model class"
        raise UnknownModelError(msg)
    return cls


def create_model(name: str, **kwargs: Any) -> AnomalibModule:  # noqa: ANN401
    """Build a model by name with its configuration's ``init_args`` as defaults, overridden by ``kwargs``.

    Args:
        name: See :func:`get_model_class`.
        **kwargs: Constructor arguments.
    """
    defaults = model_defaults(name) if get_spec(name) is not None else {}
    return get_model_class(name)(**{**defaults, **kwargs})


def config_path(name: str) -> Path:
    """Configuration file of a registered model (inside the installed package).

    Raises:
        UnknownModelError: If ``name`` is not registered.
    """
    spec = get_spec(name)
    if spec is None:
        msg = f"model {name!r} has no configuration file; registered models are {', '.join(MODELS)}"
        raise UnknownModelError(msg)
    return packaged_config(spec.config)


def packaged_config(file_name: str) -> Path:
    """A model configuration shipped with the package, by file name (``"simpleslicenet_phantom.yaml"``).

    Raises:
        FileNotFoundError: No such file among the packaged configurations.
    """
    import importlib.resources  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    path = Path(str(importlib.resources.files("simpleslicenet") / "configs" / "model" / file_name))
    if not path.is_file():
        msg = f"no packaged model configuration {file_name!r} (see simpleslicenet/configs/model/)"
        raise FileNotFoundError(msg)
    return path


def config_init_args(path: str | Path) -> dict[str, Any]:
    """``model.init_args`` of an anomalib model configuration file (lists become tuples)."""
    from pathlib import Path  # noqa: PLC0415

    import yaml  # noqa: PLC0415

    config = yaml.safe_load(Path(path).read_text()) or {}
    init_args = (config.get("model") or {}).get("init_args") or {}
    return {key: tuple(value) if isinstance(value, list) else value for key, value in init_args.items()}


def model_defaults(name: str) -> dict[str, Any]:
    """The defaults of a registered model: its configuration file's ``init_args``."""
    return config_init_args(config_path(name))
