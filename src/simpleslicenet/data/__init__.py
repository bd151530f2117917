"""Brain MRI data: NIfTI volumes, the slice-stack batch, datasets and datamodules.

A volume travels as a :class:`VolumeBatch` of its axial slices, in order (see :mod:`.batch`).

Example:
    >>> from simpleslicenet.data import NiftiFolder
    >>> datamodule = NiftiFolder(root="./datasets/my_mri")  # doctest: +SKIP
    >>> datamodule.setup()  # doctest: +SKIP
"""

from simpleslicenet.data.batch import VolumeBatch, VolumeItem, collate_volumes
from simpleslicenet.data.datamodules import (
    IXI,
    BrainPhantom,
    Br35H,
    BraTS2021,
    IXIBraTS,
    NiftiFolder,
    VolumeDataModule,
)
from simpleslicenet.data.dataset import VolumeDataset, volume_to_batch
from simpleslicenet.data.preprocess import preprocess_folder, preprocess_scan
from simpleslicenet.data.volume import (
    LoadedVolume,
    VolumeError,
    VolumeGeometry,
    from_slices,
    load_volume,
    read_mask,
    read_nifti,
    to_slices,
    write_nifti,
)

__all__ = [
    "VolumeBatch",
    "VolumeItem",
    "collate_volumes",
    "VolumeDataset",
    "volume_to_batch",
    "VolumeDataModule",
    "BrainPhantom",
    "NiftiFolder",
    "BraTS2021",
    "IXI",
    "IXIBraTS",
    "Br35H",
    "LoadedVolume",
    "VolumeError",
    "VolumeGeometry",
    "load_volume",
    "read_nifti",
    "read_mask",
    "write_nifti",
    "to_slices",
    "from_slices",
    "preprocess_scan",
    "preprocess_folder",
]
