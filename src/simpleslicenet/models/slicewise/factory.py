"""``slicewise(Model)``: the volume-aware subclass of any anomalib image model, made on demand."""

from __future__ import annotations

import sys

from anomalib.models.components import AnomalibModule

from simpleslicenet.models.slicewise.mixin import SliceWiseMixin

__all__ = ["slicewise", "resolve_slicewise"]

_FACTORY_CACHE: dict[type, type] = {}
# Made classes live in the package namespace, so they pickle and resolve by dotted path there.
PACKAGE = "simpleslicenet.models.slicewise"


def slicewise(model_class: type[AnomalibModule]) -> type[AnomalibModule]:
    """Make the volume-aware subclass of an anomalib image model, e.g. ``slicewise(Padim)``.

    The class is named ``<Model>Slices`` and lives in the package (``Stfpm`` → ``StfpmSlices``), so it
    pickles and resolves by dotted path (``simpleslicenet.models.slicewise.StfpmSlices``) like a class
    written by hand. Calling it twice gives the same class.

    Args:
        model_class: An :class:`~anomalib.models.components.AnomalibModule` subclass for images.
    """
    if isinstance(model_class, type) and issubclass(model_class, SliceWiseMixin):
        return model_class
    if not (isinstance(model_class, type) and issubclass(model_class, AnomalibModule)):
        msg = f"slicewise() expects an anomalib model class, got {model_class!r}"
        raise TypeError(msg)
    if model_class in _FACTORY_CACHE:
        return _FACTORY_CACHE[model_class]
    name = f"{model_class.__name__}Slices"
    namespace = sys.modules[PACKAGE].__dict__
    existing = namespace.get(name)
    if isinstance(existing, type) and model_class in existing.__mro__:
        _FACTORY_CACHE[model_class] = existing
        return existing
    doc = (
        f"anomalib's :class:`{model_class.__module__}.{model_class.__name__}` on the axial slices of volumes, "
        "with 3D maps and volume scores (see :class:`SliceWiseMixin` for the extra arguments)."
    )
    cls = type(name, (SliceWiseMixin, model_class), {"__module__": PACKAGE, "__qualname__": name, "__doc__": doc})
    _FACTORY_CACHE[model_class] = cls
    namespace[name] = cls
    return cls


def resolve_slicewise(name: str) -> type:
    """``<Model>Slices`` for any anomalib image model (dotted paths, unpickling); ``AttributeError`` otherwise."""
    if name.endswith("Slices") and name != "Slices":
        import anomalib.models  # noqa: PLC0415

        base = getattr(anomalib.models, name[: -len("Slices")], None)
        if isinstance(base, type) and issubclass(base, AnomalibModule):
            return slicewise(base)
    msg = f"module {PACKAGE!r} has no attribute {name!r}"
    raise AttributeError(msg)
