"""Raw scans to model-ready volumes: N4, registration to MNI152 at 1 mm, brain extraction, DICOM input.

The models expect what the paper used: skull-stripped scans, affinely registered to MNI152 and
resampled to 1 mm. This package produces that from raw NIfTI scans or DICOM series with SimpleITK:

1. reading (NIfTI with the package's guarded reader; a folder of DICOM slices with SimpleITK's
   ``ImageSeriesReader``, its geometry taken from the headers);
2. N4 bias-field correction (:mod:`.bias_field`);
3. rigid, then affine registration to nilearn's MNI152 2009 template with Mattes mutual
   information over a multi-resolution pyramid (:mod:`.registration`, :mod:`.template`);
4. resampling onto the template's 1 mm grid (linear for the scan, nearest neighbour for masks);
5. brain extraction: the template's brain mask carried through the registration and refined with
   the scan's intensities (:mod:`.brain_mask`), or, for input that is already skull-stripped, the
   mask derived from intensities (or the dataset's own ``NAME_brain`` mask when there is one).

:func:`preprocess_scan` does one scan (:mod:`.scan`); :func:`preprocess_inputs` /
:func:`preprocess_folder` a resumable, parallel batch (:mod:`.batch`, :mod:`.manifest`);
:func:`preprocess_bids` the same batch on a BIDS dataset's scans, written as a BIDS derivatives dataset
(:mod:`.bids`). The ``simpleslicenet preprocess`` command wraps them. DICOM series can also just be converted
(:func:`convert_dicom_series`, ``--dicom-only``). Not done: non-linear registration.

Example:
    >>> from simpleslicenet.data.preprocess import preprocess_inputs
    >>> report = preprocess_inputs(["raw/"], "datasets/mine", workers=2)  # doctest: +SKIP
    >>> print(report.table())  # doctest: +SKIP
"""

from simpleslicenet.data.preprocess.batch import (
    BatchReport,
    ScanJob,
    ScanOutcome,
    find_jobs,
    preprocess_folder,
    preprocess_inputs,
    preprocess_jobs,
)
from simpleslicenet.data.preprocess.bids import PIPELINE_NAME, is_bids_dataset, preprocess_bids
from simpleslicenet.data.preprocess.dicom import convert_dicom_series, read_dicom_series
from simpleslicenet.data.preprocess.manifest import MANIFEST_NAME
from simpleslicenet.data.preprocess.scan import PreprocessResult, PreprocessSettings, preprocess_scan
from simpleslicenet.data.preprocess.template import TEMPLATE_SPACE

__all__ = [
    "PreprocessSettings",
    "PreprocessResult",
    "preprocess_scan",
    "preprocess_inputs",
    "preprocess_folder",
    "preprocess_jobs",
    "preprocess_bids",
    "is_bids_dataset",
    "PIPELINE_NAME",
    "TEMPLATE_SPACE",
    "BatchReport",
    "ScanJob",
    "ScanOutcome",
    "find_jobs",
    "convert_dicom_series",
    "read_dicom_series",
    "MANIFEST_NAME",
]
