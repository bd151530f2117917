"""A BIDS dataset's anatomical scans preprocessed into a BIDS derivatives dataset.

:func:`preprocess_bids` takes the scans from the BIDS reader (:class:`~simpleslicenet.data.bids.BidsDataset`:
a contrast, optional session, acquisition and run, the participants by a selection spec) and runs them
through the same batch as any other input (:func:`~simpleslicenet.data.preprocess.batch.preprocess_jobs`:
manifest, skipping finished scans, per-scan failures, parallel workers). Only the names differ: each
job names its outputs by the BIDS derivatives rules and asks for a JSON sidecar beside each one::

    OUTPUT/dataset_description.json        DatasetType "derivative", GeneratedBy, SourceDatasets, DatasetLinks
    OUTPUT/sub-<label>/[ses-<label>/]anat/
        <source entities>[_space-MNI152NLin2009aAsym]_desc-preproc_<suffix>.nii.gz (+ .json)   the scan
        <source entities>[_space-MNI152NLin2009aAsym]_desc-brain_mask.nii.gz (+ .json)         its brain mask
        <source entities>[_space-MNI152NLin2009aAsym]_desc-lesion_mask.nii.gz (+ .json)        its lesion mask, if any
        <source entities>_from-<suffix>_to-MNI152NLin2009aAsym_mode-image_xfm.txt                the affine (ITK)

The ``space`` entity appears only when the scans were registered; without registration they stay in
their own space (reoriented and resampled) and carry none. The sidecars name their sources as BIDS URIs
(``bids:raw:sub-01/anat/sub-01_T2w.nii.gz``, ``raw`` defined in ``DatasetLinks``) and record the settings.
The BIDS specification has no naming for transform files yet, so ``.bidsignore`` lists them (and the
batch manifest); everything else passes the BIDS validator as a dataset of its own. The reader reads
the result back with ``BidsDataset(root, derivatives="simpleslicenet-preprocess")``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from simpleslicenet._version import __version__
from simpleslicenet.data.bids import (
    BRAIN_DESC,
    DERIVATIVES,
    LESION_DESC,
    PREPROC_DESC,
    BidsDataset,
    BidsError,
    BidsScan,
    bids_uri,
    is_bids_dataset,
    write_derivatives_description,
)
from simpleslicenet.data.preprocess.batch import BatchReport, ScanJob, preprocess_jobs
from simpleslicenet.data.preprocess.manifest import MANIFEST_NAME
from simpleslicenet.data.preprocess.scan import PIPELINE_VERSION, PreprocessSettings
from simpleslicenet.data.preprocess.template import TEMPLATE_SPACE

__all__ = [
    "PIPELINE_NAME",
    "is_bids_dataset",
    "bids_jobs",
    "preprocess_bids",
]

# The derivatives folder's default name, under the dataset's derivatives/.
PIPELINE_NAME = "simpleslicenet-preprocess"
# No BIDS naming for transforms yet (BEP014): the validator is told to leave them alone, and the manifest.
BIDSIGNORE = ("*_xfm.txt", MANIFEST_NAME)
_README = """# {name}

Scans preprocessed by `simpleslicenet preprocess` for anomaly detection: see each file's JSON sidecar for
its sources and settings. Transforms (`*_xfm.txt`, ITK text format, template point to scan point) have no
BIDS naming yet and are listed in `.bidsignore`, as is the batch record `{manifest}`.
"""


def _steps(settings: PreprocessSettings) -> str:
    """What was done, in words, for the sidecars' Description."""
    steps = ["N4 bias-field correction"] if settings.bias_correction else []
    if settings.register:
        steps.append(f"rigid then affine registration to {TEMPLATE_SPACE} (Mattes mutual information)")
        steps.append(f"resampling onto the template's grid at {settings.spacing_mm:g} mm")
    else:
        steps.append(f"reorientation to RAS and resampling to {settings.spacing_mm:g} mm voxels in its own space")
    steps.append("brain extraction (voxels outside the brain set to zero)")
    return "; ".join(steps)


def _transform_name(scan: BidsScan) -> str:
    """``<source entities>_from-<suffix>_to-<template>_mode-image_xfm.txt`` (fMRIPrep's naming).

    The file holds the ITK transform from template points to scan points (fixed: the template, moving: the
    scan), the one that resamples the scan into the template; fMRIPrep names that one from the scan's space
    to the template's.
    """
    entities = scan.derivative_name(None, "xfm", extension="").removesuffix("_xfm")
    return f"{entities}_from-{scan.suffix}_to-{TEMPLATE_SPACE}_mode-image_xfm.txt"


def bids_jobs(scans: Sequence[BidsScan], root: str | os.PathLike, settings: PreprocessSettings) -> list[ScanJob]:
    """One preprocessing job per scan, named and described as BIDS derivatives (see the module notes).

    Args:
        scans: Raw scans of the dataset (from :meth:`BidsDataset.scans`).
        root: The raw dataset's root (the sidecars' sources are given relative to it).
        settings: The settings the jobs run with (recorded in every sidecar).
    """
    root = Path(root)
    space = TEMPLATE_SPACE if settings.register else None
    record = {"settings": settings.to_dict(), "pipeline_version": PIPELINE_VERSION, "version": __version__}
    description = _steps(settings)
    jobs = []
    for scan in scans:
        source = bids_uri(scan.source_path, root)
        brain_sources = [bids_uri(scan.brain_mask_path, root)] if scan.brain_mask_path is not None else []
        if scan.brain_mask_path is not None:
            brain_origin = "the dataset's own brain mask carried onto the output grid (nearest neighbour)"
        elif settings.register and not settings.skull_stripped:
            brain_origin = "the template's brain mask carried through the registration and refined on the scan"
        else:
            brain_origin = "derived from the scan's intensities"
        sidecars: dict[str, dict[str, Any]] = {
            "image": {
                "Description": f"{scan.suffix} scan preprocessed by simpleslicenet: {description}.",
                "Sources": [source, *brain_sources],
                "SkullStripped": True,
                "SimpleSliceNet": record,
            },
            "brain_mask": {
                "Type": "Brain",
                "Description": f"Brain mask of the preprocessed scan: {brain_origin}.",
                "Sources": [source, *brain_sources],
                "SimpleSliceNet": record,
            },
        }
        if scan.mask_path is not None:
            sidecars["lesion_mask"] = {
                "Type": "Lesion",
                "Description": "Lesion mask carried onto the preprocessed scan's grid (nearest neighbour).",
                "Sources": [bids_uri(scan.mask_path, root), source],
                "SimpleSliceNet": record,
            }
        if space is None:
            # Without registration the outputs keep the world coordinates of the raw scan.
            for sidecar in sidecars.values():
                sidecar["SpatialReference"] = source
        names = {
            "brain_mask": scan.derivative_name(BRAIN_DESC, "mask", space=space),
            "lesion_mask": scan.derivative_name(LESION_DESC, "mask", space=space),
            "transform": _transform_name(scan),
        }
        name = scan.derivative_folder() / scan.derivative_name(PREPROC_DESC, scan.suffix, space=space)
        jobs.append(ScanJob(name.as_posix(), scan.source_path, scan.mask_path, scan.brain_mask_path, names, sidecars))
    return jobs


def preprocess_bids(
    root: str | os.PathLike,
    output: str | os.PathLike | None = None,
    settings: PreprocessSettings | None = None,
    participants: str | Sequence[str] | None = None,
    suffix: str = "T2w",
    session: str | None = None,
    acquisition: str | None = None,
    run: str | int | None = None,
    lesion_masks: str | None = "auto",
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    threads: int | None = None,
    log: Callable[[str], None] | None = None,
) -> BatchReport:
    """Preprocess a BIDS dataset's scans into a BIDS derivatives dataset (see the module notes).

    Args:
        root: The BIDS dataset.
        output: The derivatives dataset's folder; ``ROOT/derivatives/simpleslicenet-preprocess`` by default.
        settings: What to do with each scan (:class:`PreprocessSettings` defaults when ``None``).
        participants: Selection spec (``"group=control"``, a list of labels, ``None``: all).
        suffix: The contrast (``"T2w"``, ``"T1w"``, ``"FLAIR"``, ...).
        session: Only this session.
        acquisition: Only scans with this ``acq`` entity.
        run: Only scans with this ``run`` index.
        lesion_masks: The derivatives folder holding the lesion (and brain) masks; ``"auto"``: any
            folder under ``derivatives/`` but the output and other folders of preprocessed scans; ``None``: none.
        workers: See :func:`~simpleslicenet.data.preprocess.batch.preprocess_inputs`.
        overwrite: Also replace files (and a ``dataset_description.json``) that this batch did not write.
        progress: Show a progress bar.
        threads: Threads per scan.
        log: Where per-scan lines and the summary go.

    Returns:
        Every outcome; ``report.failed`` is empty when all scans succeeded.

    Raises:
        BidsError: The dataset cannot be read, the selection names unknown participants, or it holds
            no scan of ``suffix``.
        ValueError: DICOM-only settings (a BIDS dataset holds NIfTI scans), or ``workers`` below 1.
        FileExistsError: ``output`` holds another pipeline's derivatives.
    """
    root = Path(root)
    settings = settings or PreprocessSettings()
    if settings.dicom_only:
        msg = "a BIDS dataset holds NIfTI scans: DICOM-only conversion does not apply"
        raise ValueError(msg)
    output = Path(output) if output is not None else root / DERIVATIVES / PIPELINE_NAME
    output = output.resolve()
    dataset = BidsDataset(
        root, suffix=suffix, session=session, acquisition=acquisition, run=run,
        lesion_masks=lesion_masks, exclude_derivatives=(output.name,) if output.parent == (root / DERIVATIVES).resolve() else (),
    )  # fmt: skip
    scans = dataset.scans(participants)
    if not scans:
        chosen = "" if participants is None else f" of the participants chosen ({participants})"
        raise BidsError(root, f"no {suffix} scans{chosen}")
    name = f"simpleslicenet preprocessing of {dataset.description.get('Name', root.name)}"
    write_derivatives_description(
        output, name, __version__, root.resolve(),
        "simpleslicenet preprocess: bias-field correction, registration to MNI152 and brain extraction, as each "
        "file's sidecar records",
        overwrite=overwrite, readme=_README.format(name=name, manifest=MANIFEST_NAME), bidsignore=BIDSIGNORE,
    )  # fmt: skip
    jobs = bids_jobs(scans, root, settings)
    return preprocess_jobs(jobs, output, settings, workers, overwrite, progress, threads, log)
