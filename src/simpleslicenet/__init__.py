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

Importing this package is cheap: classes load on first use, so the start-up hook that registers them
with anomalib costs nothing in processes that never touch them.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public name -> module that defines it (loaded on first attribute access).
_LAZY = {
    "SimpleSliceNet": "simpleslicenet.models.simpleslicenet",
    "AE3D": "simpleslicenet.models.ae3d",
    "PatchcoreSlices": "simpleslicenet.models.slicewise",
    "CflowSlices": "simpleslicenet.models.slicewise",
    "slicewise": "simpleslicenet.models.slicewise",
    "BrainPhantom": "simpleslicenet.data.datamodules",
    "NiftiFolder": "simpleslicenet.data.datamodules",
    "BraTS2021": "simpleslicenet.data.datamodules",
    "IXI": "simpleslicenet.data.datamodules",
    "IXIBraTS": "simpleslicenet.data.datamodules",
    "VolumeBatch": "simpleslicenet.data.batch",
    "VolumeInferencer": "simpleslicenet.deploy",
    "register": "simpleslicenet.plugin",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):  # noqa: ANN202
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    msg = f"module 'simpleslicenet' has no attribute {name!r}"
    raise AttributeError(msg)
