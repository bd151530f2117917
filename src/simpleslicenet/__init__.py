"""simpleslicenet: unsupervised anomaly detection for 3D brain MRI, as a plugin for anomalib.

A frozen ImageNet backbone reads every axial slice, features are pooled locally and across
neighbouring slices, and a conditional normalizing flow scores every location (SimpleSliceNet,
Zhang & Mohsenzadeh, arXiv 2408.15958). Baselines (PatchCore/CFlow slice by slice, a 3D
autoencoder), NIfTI datamodules with a built-in brain phantom, volumetric metrics, a benchmark sweep
and OpenVINO deployment come with it.

Example:
    >>> from anomalib.engine import Engine
    >>> from simpleslicenet import BrainPhantom, SimpleSliceNet
    >>> datamodule = BrainPhantom(n_healthy=12, n_lesion=8)  # generated on first use, no download
    >>> model = SimpleSliceNet()
    >>> engine = Engine(max_epochs=2, accelerator="cpu")
    >>> engine.fit(model, datamodule=datamodule)  # doctest: +SKIP
    >>> engine.test(model, datamodule=datamodule)  # doctest: +SKIP

Importing this package is cheap: classes load on first use. Models come from the one model table
(:mod:`simpleslicenet.models.registry`), datamodules from :mod:`simpleslicenet.data.datamodules`.
"""

from __future__ import annotations

import importlib

from simpleslicenet._version import __version__

# Public names other than models and datamodules -> the module that defines them.
_LAZY = {
    "slicewise": "simpleslicenet.models.slicewise",
    "VolumeBatch": "simpleslicenet.data.batch",
    "VolumePreprocessing": "simpleslicenet.data.volume",
    "VolumeInferencer": "simpleslicenet.deploy",
    "register": "simpleslicenet.plugin",
}
_DATAMODULES = "simpleslicenet.data.datamodules"

# The package is imported at every interpreter start-up (the anomalib hook lives in it), so even the model
# table is read only on first use; ``__all__`` comes from it too.


def __getattr__(name: str):  # noqa: ANN202
    from simpleslicenet.models.registry import MODELS

    if name == "__all__":
        return [*MODELS, *_LAZY, *importlib.import_module(_DATAMODULES).__all__, "__version__"]
    if name in MODELS:
        return getattr(importlib.import_module("simpleslicenet.models"), name)
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    datamodules = importlib.import_module(_DATAMODULES)
    if name in datamodules.__all__:
        return getattr(datamodules, name)
    msg = f"module 'simpleslicenet' has no attribute {name!r}"
    raise AttributeError(msg)
