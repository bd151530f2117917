"""The files written for one scan, named and written in one place: at test time and by ``predict`` alike.

For a scan named ``NAME`` (:func:`output_paths`):

* ``NAME_anomaly_map.nii.gz``: voxel scores on the scan's own grid and affine (it overlays the scan in
  ITK-SNAP or FSLeyes); outside the model's box the volume's lowest score;
* ``NAME_pvalue_map.nii.gz``: with a calibration, voxel p-values (1 outside the brain);
* ``NAME_anomaly_mask.nii.gz``: with a threshold or a false discovery rate, the flagged voxels (``uint8``);
* ``NAME_preview.png``: the slices that matter, the map inside the brain with its colour bar, the flagged
  region's contour and the true lesion outline when known (:func:`simpleslicenet.preview.draw_preview`).

Every file is written atomically. :class:`~simpleslicenet.visualization.VolumeMapWriter` (the models'
test-time writer) and :func:`simpleslicenet.deploy.predict.predict_paths` both call
:func:`write_scan_outputs`, so the same scan gives the same files either way.

Example:
    >>> outputs = ScanOutputs("sub-01", geometry, model_map, mask=threshold_mask(model_map, 0.5, brain))  # doctest: +SKIP
    >>> write_scan_outputs(outputs, "maps/")  # doctest: +SKIP
    {'map': PosixPath('maps/sub-01_anomaly_map.nii.gz'), 'mask': PosixPath('maps/sub-01_anomaly_mask.nii.gz')}
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simpleslicenet.atomic import leave_stop_signals_to_the_main_thread
from simpleslicenet.data.geometry import VolumeGeometry
from simpleslicenet.data.nifti import write_nifti
from simpleslicenet.preview import draw_preview

__all__ = ["OUTPUT_FILES", "ScanOutputs", "one_write_in_flight", "output_paths", "threshold_mask", "write_scan_outputs"]

# Output -> what follows the scan's name, in the order the files are listed.
OUTPUT_FILES = {
    "map": "_anomaly_map.nii.gz",
    "preview": "_preview.png",
    "pvalue_map": "_pvalue_map.nii.gz",
    "mask": "_anomaly_mask.nii.gz",
}


def threshold_mask(model_map: np.ndarray, threshold: float, brain: np.ndarray | None = None) -> np.ndarray:
    """Voxels whose score reaches ``threshold`` (inside ``brain`` when given): the rule the Dice metrics use."""
    flagged = np.asarray(model_map) >= threshold
    return flagged if brain is None else flagged & np.asarray(brain, dtype=bool)


@dataclass
class ScanOutputs:
    """One scan's results on the model grid (all arrays ``[D, H, W]``), ready to be written.

    Args:
        name: The scan's name (``NAME`` of the files).
        geometry: Where the model grid sits in the scan.
        model_map: Voxel scores.
        scan_map: ``model_map`` already on the scan's grid (``geometry.to_scan(model_map)``), when made.
        mask: Flagged voxels, written as a mask and drawn in the preview.
        pvalues: Voxel p-values.
        image: The scan as the model saw it (needed for a preview).
        brain: Brain mask (the preview's colour scale covers the brain only).
        lesion: True lesion mask, when known (outlined in the preview).
        title: The preview's title; default the name.
        file_names: File name of each output (keys of :data:`OUTPUT_FILES`) where the default
            ``NAME`` + suffix does not fit, e.g. the entity names of a BIDS derivatives dataset.
    """

    name: str
    geometry: VolumeGeometry
    model_map: np.ndarray
    scan_map: np.ndarray | None = None
    mask: np.ndarray | None = None
    pvalues: np.ndarray | None = None
    image: np.ndarray | None = None
    brain: np.ndarray | None = None
    lesion: np.ndarray | None = None
    title: str | None = None
    file_names: dict[str, str] | None = None


def output_paths(folder: str | os.PathLike, outputs: ScanOutputs, preview: bool = False) -> dict[str, Path]:
    """Where :func:`write_scan_outputs` puts each file of ``outputs`` (keys of :data:`OUTPUT_FILES`)."""
    present = {
        "map": True,
        "preview": preview,
        "pvalue_map": outputs.pvalues is not None,
        "mask": outputs.mask is not None,
    }
    names = {key: f"{outputs.name}{suffix}" for key, suffix in OUTPUT_FILES.items()} | (outputs.file_names or {})
    return {key: Path(folder) / names[key] for key in OUTPUT_FILES if present[key]}


def write_scan_outputs(
    outputs: ScanOutputs, folder: str | os.PathLike, preview: bool = False, overwrite: bool = False
) -> dict[str, Path]:
    """Write one scan's map, and its p-value map, mask and preview where given, into ``folder``.

    Args:
        outputs: The scan's results.
        folder: Where the files go (created if needed).
        preview: Also draw the preview PNG (needs ``outputs.image``).
        overwrite: Replace existing files; otherwise refuse.

    Returns:
        The written files, as :func:`output_paths` names them.

    Raises:
        FileExistsError: A file exists and ``overwrite`` is false.
        ValueError: A preview without the scan's image.
    """
    if preview and outputs.image is None:
        msg = f"{outputs.name}: a preview needs the scan's image on the model grid"
        raise ValueError(msg)
    paths = output_paths(folder, outputs, preview)
    geometry = outputs.geometry
    scan_map = outputs.scan_map if outputs.scan_map is not None else geometry.to_scan(outputs.model_map)
    write_nifti(scan_map, geometry, paths["map"], overwrite=overwrite)
    if outputs.pvalues is not None:
        write_nifti(geometry.to_scan(outputs.pvalues, fill=1.0), geometry, paths["pvalue_map"], overwrite=overwrite)
    if outputs.mask is not None:
        mask = geometry.to_scan(outputs.mask.astype(np.uint8), fill=0)
        write_nifti(mask, geometry, paths["mask"], dtype=np.uint8, overwrite=overwrite)
    if preview:
        if not overwrite and paths["preview"].exists():
            raise FileExistsError(f"{paths['preview']}: already exists (pass overwrite=True to replace it)")
        draw_preview(
            outputs.image,
            outputs.model_map,
            paths["preview"],
            brain=outputs.brain,
            lesion=outputs.lesion,
            flagged=outputs.mask,
            title=outputs.title or outputs.name,
        )
    return paths


@contextmanager
def one_write_in_flight() -> Iterator[Callable[..., None]]:
    """A ``submit(function, *args)`` that runs one write at a time on a thread, while the next scan is read and run.

    ``predict`` and the test-time writer (:class:`~simpleslicenet.visualization.VolumeMapWriter`) write
    each scan's files this way.

    Compression releases the GIL, so on a small CPU writing then costs a scan almost no time of its own. A failed
    write stops the batch at the next submit or at the end. Every write has finished, or was cancelled,
    when the block is left (nothing may write into the staging folder once it goes).
    """
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scan-writer", initializer=leave_stop_signals_to_the_main_thread)
    pending: list[Future] = []

    def submit(function: Callable[..., object], *args: object) -> None:
        if pending:
            pending.pop().result()
        pending.append(writer.submit(function, *args))

    try:
        # The one thread starts here, before any write: a thread started inside a later submit() that a
        # signal interrupts is never joined by shutdown(), and its write could outlive the staging folder.
        writer.submit(int).result()
        yield submit
        if pending:
            pending.pop().result()
    finally:
        writer.shutdown(wait=True, cancel_futures=True)
