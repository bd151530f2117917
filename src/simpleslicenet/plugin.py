"""Registration of simpleslicenet's classes in anomalib's namespaces.

anomalib resolves ``--model NAME`` / ``--data NAME`` (and ``get_model``, ``get_datamodule``,
``anomalib benchmark``) by looking at the attributes of ``anomalib.models`` and ``anomalib.data`` and at
already-imported subclasses. Two pieces make our classes visible there:

* :func:`expose` — every simpleslicenet model and datamodule class calls it when it is defined
  (``__init_subclass__`` of their shared bases), so a class is visible as soon as it exists;
* :func:`register` — imports all of them; it runs automatically when anomalib is imported (see
  ``simpleslicenet._anomalib_hook``) and is idempotent.
"""

from __future__ import annotations

import importlib
import sys
import warnings

__all__ = ["register", "expose", "MODEL_CLASSES", "DATAMODULE_CLASSES"]

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


def expose(cls: type, namespace: str) -> None:
    """Make ``cls`` an attribute of ``namespace`` (``"anomalib.models"`` or ``"anomalib.data"``) if loaded.

    A namespace that is not imported yet gets the class later from :func:`register`.
    """
    module = sys.modules.get(namespace)
    if module is None:
        return
    setattr(module, cls.__name__, cls)
    if namespace == "anomalib.models" and hasattr(module, "ALLOWED_MODULES"):
        # get_model() imports dotted class paths only from an allow-list: the defining module and
        # its package (``simpleslicenet.models.simpleslicenet.SimpleSliceNet``).
        module.ALLOWED_MODULES.update({cls.__module__, cls.__module__.rsplit(".", 1)[0]})


def register() -> None:
    """Import simpleslicenet's models and datamodules and add them to ``anomalib.models`` / ``anomalib.data``."""
    global _registered  # noqa: PLW0603
    if _registered:
        return
    _registered = True
    # import_module returns the module even while the hook runs, before `anomalib.models`
    # is bound as an attribute of the `anomalib` package.
    importlib.import_module("anomalib.models")
    importlib.import_module("anomalib.data")
    for namespace, classes in (("anomalib.models", MODEL_CLASSES), ("anomalib.data", DATAMODULE_CLASSES)):
        for name, module_name in classes.items():
            try:
                expose(getattr(importlib.import_module(module_name), name), namespace)
            except (ImportError, AttributeError) as error:
                if module_name in sys.modules:
                    # The module is being imported right now (it imported anomalib, which ran this):
                    # its classes expose themselves when they are defined.
                    continue
                # A broken plugin must not take anomalib down with it: say what failed and go on.
                warnings.warn(f"simpleslicenet: could not register {name} ({error})", stacklevel=2)
