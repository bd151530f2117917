"""One place naming every model the sweep and the command line can run.

Each entry gives the class (as a dotted path, imported only when asked for, so the registry works
while a model's dependencies are missing), its configuration file under ``configs/model/`` and a
line of description. Any other anomalib image model is reachable by name too: ``"Stfpm"`` or
``"StfpmSlices"`` resolve to its slice-wise wrapper (:func:`~simpleslicenet.models.slicewise.slicewise`).

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
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

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
]

# configs/ sits at the project root, three levels above this package folder.
PROJECT_ROOT = Path(__file__).resolve().parents[3]


class UnknownModelError(KeyError):
    """A model name that is neither registered nor an anomalib image model."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class ModelSpec:
    """How to build one registered model.

    Args:
        name: Registry name (the class name).
        class_path: Dotted path of the :class:`~anomalib.models.components.AnomalibModule` subclass.
        config: Its configuration file, relative to the project root.
        description: One line for listings and reports.
        defaults: Arguments :func:`create_model` passes unless the caller overrides them (the same
            values the configuration file sets).
    """

    name: str
    class_path: str
    config: str
    description: str
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))


def _spec(name: str, module: str, config: str, description: str, **defaults: Any) -> ModelSpec:  # noqa: ANN401
    return ModelSpec(name, f"{module}.{name}", f"configs/model/{config}", description, defaults)


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
            backbone_weights="random",
            image_size=(192, 192),
        ),
        _spec(
            "ReverseDistillationSlices",
            _SLICEWISE,
            "reverse_distillation_slices.yaml",
            "Reverse distillation teacher-student on slices (ResNet, random init: no offline weights)",
            backbone_weights="random",
            image_size=(192, 192),
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


def _anomalib_image_model(name: str) -> type | None:
    import anomalib.models  # noqa: PLC0415

    base = name.removesuffix("Slices") if name.endswith("Slices") else name
    wanted = _normalise(base)
    for attribute in dir(anomalib.models):
        candidate = getattr(anomalib.models, attribute)
        if (
            isinstance(candidate, type)
            and issubclass(candidate, AnomalibModule)
            and candidate.__module__.startswith("anomalib.models.image")
            and _normalise(attribute) == wanted
        ):
            return candidate
    return None


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
    if not (isinstance(cls, type) and issubclass(cls, AnomalibModule)):
        msg = f"{name!r} is not an anomalib model class"
        raise UnknownModelError(msg)
    return cls


def create_model(name: str, **kwargs: Any) -> AnomalibModule:  # noqa: ANN401
    """Build a model by name with the registry's defaults, overridden by ``kwargs``.

    Args:
        name: See :func:`get_model_class`.
        **kwargs: Constructor arguments.
    """
    spec = get_spec(name)
    arguments = {**(spec.defaults if spec is not None else {}), **kwargs}
    return get_model_class(name)(**arguments)


def config_path(name: str) -> Path:
    """Configuration file of a registered model (``configs/model/…`` under the project root).

    Raises:
        UnknownModelError: If ``name`` is not registered.
    """
    spec = get_spec(name)
    if spec is None:
        msg = f"model {name!r} has no configuration file; registered models are {', '.join(MODELS)}"
        raise UnknownModelError(msg)
    return PROJECT_ROOT / spec.config
