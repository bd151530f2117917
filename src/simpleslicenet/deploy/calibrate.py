"""``simpleslicenet calibrate``: a model's healthy-scan reference, for label-free p-values and FDR masks.

Run it on healthy scans the model never trained on (held-out scans of the training cohort, or a new
site's own healthy scans, preprocessed as the training scans were); ``simpleslicenet predict
--calibration FILE`` then writes p-value maps, ranks scans by volume p-value and, with ``--fdr``,
masks without any labelled lesion scan (:mod:`simpleslicenet.calibration`). In a BIDS dataset the
held-out healthy participants are chosen by a selection spec on ``participants.tsv``
(``simpleslicenet calibrate --input BIDS_DIR --participants group=reference``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

from simpleslicenet.calibration import CalibrationError, ConformalCalibration, model_digest
from simpleslicenet.data.scans import ScanFiles
from simpleslicenet.deploy.inferencer import VolumeInferencer
from simpleslicenet.deploy.predict import input_scans
from simpleslicenet.deploy.progress import progress_rows

__all__ = ["MIN_SCANS_FOR_005", "calibrate_paths"]

logger = logging.getLogger(__name__)

# A volume p-value is at least 1/(n+1): below 19 scans none can reach 0.05.
MIN_SCANS_FOR_005 = 19


def calibrate_paths(
    model: str | os.PathLike,
    inputs: str | os.PathLike | Iterable[ScanFiles],
    output: str | os.PathLike,
    overwrite: bool = False,
    precision: str = "f32",
    device: str = "CPU",
    progress: bool = True,
) -> ConformalCalibration:
    """Score healthy scans with ``model`` and write the calibration file ``output`` (JSON).

    Args:
        model: Exported ``.xml`` or ``.ckpt``; the calibration records its digest and fits only it.
        inputs: A folder of healthy scans (or one scan), named as for ``predict``; or the scans themselves,
            e.g. a BIDS dataset's held-out healthy participants
            (:func:`~simpleslicenet.deploy.predict.bids_scan_files`).
        output: The calibration file to write.
        overwrite: Replace an existing file (atomically); otherwise refuse before reading anything.
        precision: OpenVINO precision.
        device: OpenVINO device or torch device.
        progress: Show a progress bar.

    Raises:
        FileExistsError: ``output`` exists and ``overwrite`` is false.
        VolumeError: No scans, or a scan cannot be read (calibration uses every scan or none).
        CalibrationError: No brain voxel in any scan.
    """
    output = Path(output)
    if output.exists() and not overwrite:
        msg = f"{output}: already exists; pass --overwrite to replace it"
        raise FileExistsError(msg)
    scans = input_scans(inputs)
    inferencer = VolumeInferencer(model, device=device, precision=precision)
    maps, volume_scores = [], []
    for scan in progress_rows(scans, progress, desc="calibrate", unit="scan"):
        prediction = inferencer.predict(scan.image_path, brain_mask_path=scan.brain_mask_path)
        maps.append(prediction.model_map[prediction.brain_mask.astype(bool)])
        volume_scores.append(prediction.volume_score)
    if len(scans) < MIN_SCANS_FOR_005:
        logger.warning(
            "%d calibration scans: no volume p-value can fall below %.3f (19 scans or more reach 0.05)",
            len(scans), 1 / (len(scans) + 1),
        )  # fmt: skip
    try:
        calibration = ConformalCalibration.from_scores(maps, volume_scores, model_sha256=model_digest(model))
    except CalibrationError as error:
        where = inputs if isinstance(inputs, str | os.PathLike) else f"{len(scans)} scans from {scans[0].image_path}"
        msg = f"{where}: {error}"
        raise CalibrationError(msg) from error
    calibration.save(output)
    return calibration
