"""Volumetric datamodules (one volume per item, split by whole volume) and the 2D Br35H datamodule.

``BrainPhantom`` (generated healthy anatomy with lesions) needs no download and is the default dataset;
``BIDS`` reads a BIDS dataset (participants chosen from ``participants.tsv``, masks from its derivatives).

Example:
    >>> from simpleslicenet.data.datamodules import NiftiFolder
    >>> datamodule = NiftiFolder(root="./datasets/my_mri", target_shape=(96, 96, 48))  # doctest: +SKIP
"""

from simpleslicenet.data.datamodules.base import MODALITIES, VolumeDataModule
from simpleslicenet.data.datamodules.bids import BIDS
from simpleslicenet.data.datamodules.br35h import Br35H
from simpleslicenet.data.datamodules.brats import BraTS2021
from simpleslicenet.data.datamodules.folder import NiftiFolder
from simpleslicenet.data.datamodules.ixi import IXI, IXIBraTS
from simpleslicenet.data.datamodules.phantom import BrainPhantom

__all__ = [
    "MODALITIES",
    "VolumeDataModule",
    "BrainPhantom",
    "NiftiFolder",
    "BIDS",
    "BraTS2021",
    "IXI",
    "IXIBraTS",
    "Br35H",
]
