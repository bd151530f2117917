"""Registration of simpleslicenet's classes in anomalib's namespaces.

anomalib resolves ``--model NAME`` / ``--data NAME`` (and ``get_model``, ``get_datamodule``,
``anomalib benchmark``) by looking at the attributes of ``anomalib.models`` and ``anomalib.data`` and at
already-imported subclasses. :func:`register` imports our classes and adds them there. It runs
automatically when anomalib is imported (see ``simpleslicenet._anomalib_hook``), and can be called by
hand; it is idempotent.
"""

from __future__ import annotations

__all__ = ["register", "MODEL_CLASSES", "DATAMODULE_CLASSES"]

# Short name -> module, for every class anomalib should find by name.
MODEL_CLASSES = {
    "SimpleSliceNet": "simpleslicenet.models.simpleslicenet",
    "AE3D": "simpleslicenet.models.ae3d",
    "PatchcoreSlices": "simpleslicenet.models.slicewise",
    "CflowSlices": "simpleslicenet.models.slicewise",
    "PadimSlices": "simpleslicenet.models.slicewise",
    "FastflowSlices": "simpleslicenet.models.slicewise",
    "ReverseDistillationSlices": "simpleslicenet.models.slicewise",
}
DATAMODULE_CLASSES = {
    "BrainPhantom": "simpleslicenet.data.datamodules",
    "NiftiFolder": "simpleslicenet.data.datamodules",
    "BraTS2021": "simpleslicenet.data.datamodules",
    "IXI": "simpleslicenet.data.datamodules",
    "IXIBraTS": "simpleslicenet.data.datamodules",
    "Br35H": "simpleslicenet.data.datamodules",
}

_registered = False


def register() -> None:
    """Add simpleslicenet's models and datamodules to ``anomalib.models`` / ``anomalib.data``."""
    global _registered  # noqa: PLW0603
    if _registered:
        return
    _registered = True
    import importlib
    import warnings

    # import_module returns the module even while the hook runs, before `anomalib.models`
    # is bound as an attribute of the `anomalib` package.
    models = importlib.import_module("anomalib.models")
    data = importlib.import_module("anomalib.data")
    for namespace, classes in ((models, MODEL_CLASSES), (data, DATAMODULE_CLASSES)):
        for name, module_name in classes.items():
            try:
                setattr(namespace, name, getattr(importlib.import_module(module_name), name))
            except (ImportError, AttributeError) as error:
                # A broken plugin must not take anomalib down with it: say what failed and go on.
                warnings.warn(f"simpleslicenet: could not register {name} ({error})", stacklevel=2)
    # get_model() only imports dotted class paths from an allow-list.
    models.ALLOWED_MODULES.update(set(MODEL_CLASSES.values()))
