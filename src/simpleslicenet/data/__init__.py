"""Brain MRI data: NIfTI volumes, the slice-stack batch, datasets and datamodules.

A volume travels as a :class:`VolumeBatch` of its axial slices, in order (see :mod:`.batch`).
Preparing raw scans (registration, brain extraction, DICOM) lives in :mod:`.preprocess`. Names load
on first use, so ``simpleslicenet preprocess`` or reading a NIfTI file does not import torch and anomalib.

Example:
    >>> from simpleslicenet.data import NiftiFolder
    >>> datamodule = NiftiFolder(root="./datasets/my_mri")  # doctest: +SKIP
    >>> datamodule.setup()  # doctest: +SKIP
"""

from __future__ import annotations

import importlib

from simpleslicenet.quiet import quiet_third_party_warnings

# Public name -> the module that defines it.
_LAZY = {
    "VolumeBatch": "simpleslicenet.data.batch",
    "VolumeItem": "simpleslicenet.data.batch",
    "collate_volumes": "simpleslicenet.data.batch",
    "take_rows": "simpleslicenet.data.batch",
    "volume_rows": "simpleslicenet.data.batch",
    "slice_stack": "simpleslicenet.data.slices",
    "slice_masks": "simpleslicenet.data.slices",
    "VolumeDataset": "simpleslicenet.data.dataset",
    "volume_to_batch": "simpleslicenet.data.dataset",
    "VolumeDataModule": "simpleslicenet.data.datamodules",
    "BrainPhantom": "simpleslicenet.data.datamodules",
    "NiftiFolder": "simpleslicenet.data.datamodules",
    "BIDS": "simpleslicenet.data.datamodules",
    "BraTS2021": "simpleslicenet.data.datamodules",
    "IXI": "simpleslicenet.data.datamodules",
    "IXIBraTS": "simpleslicenet.data.datamodules",
    "Br35H": "simpleslicenet.data.datamodules",
    "VolumeGeometry": "simpleslicenet.data.geometry",
    "to_slices": "simpleslicenet.data.geometry",
    "from_slices": "simpleslicenet.data.geometry",
    "VolumeError": "simpleslicenet.data.nifti",
    "read_nifti": "simpleslicenet.data.nifti",
    "read_mask": "simpleslicenet.data.nifti",
    "write_nifti": "simpleslicenet.data.nifti",
    "LoadedVolume": "simpleslicenet.data.volume",
    "VolumePreprocessing": "simpleslicenet.data.volume",
    "load_volume": "simpleslicenet.data.volume",
}

__all__ = list(_LAZY)


# The datamodules import anomalib and timm, whose imports warn about their own deprecated modules.
quiet_third_party_warnings()


def __getattr__(name: str):  # noqa: ANN202
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
