"""``simpleslicenet predict``: anomaly maps for one scan or a folder of scans, one transaction per batch.

* **Which files are scans** follows the dataset naming rule (:func:`simpleslicenet.data.scans.scans_from`):
  masks, hidden files and the command's own outputs are never read as scans.
* **A bad scan does not stop the batch.** A scan the reader refuses (:class:`~simpleslicenet.data.nifti.VolumeError`)
  or on which the model gives no finite map (:class:`~simpleslicenet.deploy.loading.ModelOutputError`) is
  reported, skipped and listed under ``"failed"`` in ``scores.json``; the command then exits non-zero.
  ``fail_fast`` (``--fail-fast``) stops at the first one instead, and nothing is written.
* **All or nothing.** Maps and summaries are written into a hidden staging folder beside the output
  folder, which replaces the output folder only once every scan has been handled
  (:func:`simpleslicenet.atomic.replace_directory`). A batch that fails or is interrupted (Ctrl-C or
  SIGTERM) leaves the previous output folder exactly as it was and removes its staging folder; a
  staging folder left by a killed process is removed by the next run. The output folder therefore
  always holds one complete batch: no new maps beside stale ones, no half-written file.
* **Strict JSON**: ``scores.json`` never holds NaN or Infinity.
* **Label-free outputs** with a calibration (:mod:`simpleslicenet.calibration`, from ``simpleslicenet
  calibrate`` on healthy scans): a voxel p-value map per scan, masks by Benjamini–Hochberg at a false
  discovery rate (``fdr``; at a lower level where the healthy calibration scans need it, see
  :mod:`simpleslicenet.calibration`), and ``scores.csv`` ranked by each scan's volume p-value, most suspicious first,
  with the number and sizes of its flagged clusters.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import shutil
import signal
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from simpleslicenet.atomic import TEMP_PREFIX, abandoned_paths, atomic_write_text, recover_directory, replace_directory
from simpleslicenet.calibration import CalibrationError, ConformalCalibration, model_digest
from simpleslicenet.clusters import cluster_sizes_ml
from simpleslicenet.data.nifti import VolumeError, write_nifti
from simpleslicenet.data.scans import OUTPUT_SUFFIXES, ScanFiles, nifti_stem, scans_from
from simpleslicenet.deploy.inferencer import VolumeInferencer
from simpleslicenet.deploy.loading import ModelOutputError

__all__ = ["PredictionReport", "SUMMARY_FILES", "output_paths", "predict_paths"]

logger = logging.getLogger(__name__)

SUMMARY_FILES = ("scores.json", "scores.csv")
PREVIEW_SUFFIX = "_preview.png"
_STAGING_TAG = "predict"


@dataclass
class PredictionReport:
    """What one ``predict`` batch did.

    Args:
        output: The output folder.
        scans: One record per predicted scan: ``scan``, ``volume_score``, ``slice_scores``, ``map_path``;
            with a calibration ``volume_pvalue`` and ``pvalue_map_path``; with a mask ``mask_path``,
            ``clusters`` and ``cluster_sizes_ml`` (largest first).
        failed: One record per skipped scan: ``scan`` and ``error``.
    """

    output: Path
    scans: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """``True`` if no scan failed."""
        return not self.failed


def output_paths(scan: ScanFiles, output: Path, mask: bool, pvalues: bool = False, preview: bool = False) -> dict[str, Path]:
    """Where the outputs for ``scan`` go."""
    stem = scan.name
    paths = {"map": output / f"{stem}_anomaly_map.nii.gz"}
    if preview:
        paths["preview"] = output / f"{stem}{PREVIEW_SUFFIX}"
    if pvalues:
        paths["pvalue_map"] = output / f"{stem}_pvalue_map.nii.gz"
    if mask:
        paths["mask"] = output / f"{stem}_anomaly_mask.nii.gz"
    return paths


def _is_predict_output(path: Path) -> bool:
    if not path.is_file() or path.is_symlink():
        return False
    stem = nifti_stem(path)
    return path.name in SUMMARY_FILES or path.name.endswith(PREVIEW_SUFFIX) or (stem is not None and stem.endswith(OUTPUT_SUFFIXES))


def _check_output_folder(output: Path, overwrite: bool) -> None:
    """Refuse an output folder that holds anything but a previous batch, or one when not overwriting."""
    if output.exists() and not output.is_dir():
        msg = f"{output}: exists and is not a folder; choose an output folder"
        raise FileExistsError(msg)
    if not output.is_dir():
        return
    entries = sorted(output.iterdir())
    foreign = [path for path in entries if not _is_predict_output(path)]
    if foreign:
        msg = (
            f"{output}: holds {len(foreign)} entries that predict did not write (e.g. {foreign[0].name}); the folder "
            "is replaced as a whole when a batch completes, so choose a new or empty output folder"
        )
        raise FileExistsError(msg)
    if entries and not overwrite:
        msg = f"{entries[0]}: already exists ({len(entries)} output files in all); pass --overwrite to replace them"
        raise FileExistsError(msg)


def _staging_prefix(output: Path) -> str:
    return f"{TEMP_PREFIX}{output.name}.{_STAGING_TAG}-"


def _remove_abandoned_staging(output: Path) -> None:
    """Finish or undo what killed runs left beside this output (their pid is gone)."""
    recover_directory(output)
    for path in abandoned_paths(output.parent, _staging_prefix(output)):
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def _terminate_unwinds() -> Iterator[None]:
    """While active, SIGTERM raises ``SystemExit`` (as Ctrl-C raises ``KeyboardInterrupt``), so cleanup runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def exit_on_terminate(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, exit_on_terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back while the finished batch is swapped in, so the swap is never cut in half."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # a held signal is delivered here


def _resolve_threshold(threshold: float | str | None, inferencer: VolumeInferencer, model: object) -> float | None:
    if threshold == "val":
        threshold = inferencer.metadata.get("dice_threshold")
        if threshold is None:
            msg = f"{model}: holds no validation threshold (trained without a validation split); pass a number"
            raise ValueError(msg)
    return None if threshold is None else float(threshold)


def _load_calibration(path: str | os.PathLike | None, model: str | os.PathLike, fdr: float | None) -> ConformalCalibration | None:
    if path is None:
        if fdr is not None:
            msg = "--fdr needs a calibration (--calibration FILE, from simpleslicenet calibrate on healthy scans)"
            raise CalibrationError(msg)
        return None
    calibration = ConformalCalibration.load(path)
    if calibration.model_sha256 is not None and calibration.model_sha256 != model_digest(model):
        msg = f"{path}: was made with another model than {model}; calibrate this model on healthy scans"
        raise CalibrationError(msg)
    return calibration


@dataclass
class _Decision:
    """One scan's model-grid mask (threshold or FDR) and voxel p-values, when asked for."""

    mask: np.ndarray | None
    pvalues: np.ndarray | None


def _decide(prediction: Any, threshold: float | None, calibration: ConformalCalibration | None, fdr: float | None) -> _Decision:  # noqa: ANN401
    brain = prediction.brain_mask.astype(bool)
    pvalues = mask = None
    if calibration is not None:
        pvalues = np.ones(brain.shape, dtype=np.float32)
        pvalues[brain] = calibration.voxel_pvalues(prediction.model_map[brain])
    if fdr is not None:
        mask = np.zeros(brain.shape, dtype=bool)
        mask[brain] = calibration.flag(pvalues[brain], fdr)
    elif threshold is not None:
        mask = (prediction.model_map > threshold) & brain
    return _Decision(mask, pvalues)


def _write_outputs(prediction: Any, decision: _Decision, staged: dict[str, Path]) -> None:  # noqa: ANN401
    """Write one scan's map (p-value map, mask) into the staging folder, on the scan's own grid."""
    geometry = prediction.geometry
    write_nifti(prediction.anomaly_map, geometry, staged["map"])
    if decision.pvalues is not None:
        write_nifti(geometry.to_scan(decision.pvalues, fill=1.0), geometry, staged["pvalue_map"])
    if decision.mask is not None:
        write_nifti(geometry.to_scan(decision.mask.astype(np.uint8), fill=0), geometry, staged["mask"], dtype=np.uint8)
    if "preview" in staged:
        from simpleslicenet.preview import draw_preview  # matplotlib: only when previews are asked for

        title = f"{staged['map'].name.removesuffix('_anomaly_map.nii.gz')}: volume score {prediction.volume_score:.4g}"
        draw_preview(prediction.model_image, prediction.model_map, staged["preview"], brain=prediction.brain_mask,
                     flagged=decision.mask, title=title)  # fmt: skip


def _ranked(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Most suspicious first: smallest volume p-value (when calibrated), then highest volume score."""
    return sorted(records, key=lambda r: (r.get("volume_pvalue", 1.0), -r["volume_score"]))


def _summaries(report: PredictionReport, model: object, settings: dict[str, Any]) -> dict[str, str]:
    document = {"model": str(model), **settings, "scans": report.scans, "failed": report.failed}
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["rank", "scan", "volume_pvalue", "volume_score", "max_slice_score", "clusters",
                     "cluster_sizes_ml", "flagged_ml", "map_path", "error"])  # fmt: skip
    for rank, record in enumerate(_ranked(report.scans), start=1):
        sizes = record.get("cluster_sizes_ml")
        writer.writerow([
            rank, record["scan"], record.get("volume_pvalue", ""), record["volume_score"], max(record["slice_scores"]),
            record.get("clusters", ""), "" if sizes is None else ";".join(f"{v:.2f}" for v in sizes),
            "" if sizes is None else f"{sum(sizes):.2f}", record["map_path"], "",
        ])  # fmt: skip
    for record in report.failed:
        writer.writerow(["", record["scan"], "", "", "", "", "", "", "", record["error"]])
    # allow_nan=False: a NaN that slipped through fails the batch instead of writing invalid JSON.
    return {"scores.json": json.dumps(document, indent=2, allow_nan=False), "scores.csv": buffer.getvalue()}


def _record(scan: ScanFiles, prediction: Any, decision: _Decision, calibration: ConformalCalibration | None,  # noqa: ANN401
            staged: dict[str, Path], output: Path) -> dict[str, Any]:  # fmt: skip
    record: dict[str, Any] = {
        "scan": str(scan.image_path),
        "volume_score": prediction.volume_score,
        "slice_scores": [float(s) for s in prediction.slice_scores],
    }
    if calibration is not None:
        record["volume_pvalue"] = calibration.volume_pvalue(prediction.volume_score)
    if decision.mask is not None:
        sizes = cluster_sizes_ml(decision.mask, prediction.geometry.voxel_ml)
        record["clusters"] = len(sizes)
        record["cluster_sizes_ml"] = [round(float(v), 4) for v in sizes]
    record.update({f"{key}_path": str(output / path.name) for key, path in staged.items()})
    return record


def predict_paths(
    model: str | os.PathLike,
    inputs: str | os.PathLike,
    output: str | os.PathLike,
    threshold: float | str | None = None,
    overwrite: bool = False,
    precision: str = "f32",
    device: str = "CPU",
    progress: bool = True,
    fail_fast: bool = False,
    calibration: str | os.PathLike | None = None,
    fdr: float | None = None,
    previews: bool = False,
) -> PredictionReport:
    """Write an anomaly map (and optionally a mask) per scan, plus ``scores.json`` and ``scores.csv``.

    Maps are in each scan's own grid and affine, so they overlay the scan in any viewer. Scores are in
    the model's own units (higher is more anomalous). The output folder is replaced as a whole when
    the batch is complete (see the module docstring).

    Args:
        model: Exported ``.xml`` or ``.ckpt``.
        inputs: A scan or a folder of scans.
        output: Output folder: new, empty, or holding a previous batch's outputs only.
        threshold: Also write ``<scan>_anomaly_mask.nii.gz`` of voxels whose score exceeds it; ``"val"``
            uses the threshold that maximised Dice on the validation split during training.
        overwrite: Replace a previous batch's outputs; otherwise refuse before reading anything.
        precision: OpenVINO precision, ``"f32"`` or ``"bf16"``.
        device: OpenVINO device or torch device.
        progress: Show a progress bar.
        fail_fast: Stop at the first bad scan (nothing is written) instead of skipping it.
        calibration: A calibration file of this model (``simpleslicenet calibrate``): adds a voxel p-value
            map per scan (``<scan>_pvalue_map.nii.gz``) and each scan's ``volume_pvalue``.
        fdr: With a calibration, write the mask of voxels that pass Benjamini–Hochberg at this false
            discovery rate instead of a score threshold (no lesion labels needed).
        previews: Also write ``<scan>_preview.png`` (:mod:`simpleslicenet.preview`): the slices where the
            map peaks, the map inside the brain with a colour bar, the mask's contour.

    Returns:
        The batch's records; scans that were skipped are in ``failed``.

    Raises:
        FileExistsError: The output folder holds outputs and ``overwrite`` is false, or holds other files.
        CalibrationError: An unusable calibration file, one made with another model, or ``fdr`` without one.
        VolumeError: The input is not a scan or a folder of scans, or (``fail_fast``) a scan is bad.
        ModelFileError: The model cannot be used (:class:`~simpleslicenet.deploy.loading.ModelOutputError`
            with ``fail_fast`` when it gives no finite map for a scan).
    """
    scans = scans_from(inputs)
    output = Path(output)
    if output.name in {"", ".", ".."}:
        output = output.resolve()  # the staging folder is named after the output folder
    _check_output_folder(output, overwrite)
    if fdr is not None and threshold is not None:
        msg = "give a score threshold or a false discovery rate for the mask, not both"
        raise ValueError(msg)
    calibrated = _load_calibration(calibration, model, fdr)
    level = None
    if fdr is not None:
        level = calibrated.fdr_level(fdr)  # refuses a rate outside (0, 1) before any scan is read
        if level == 0:
            needed = math.ceil(1 / fdr - 1 - 1e-9)
            msg = f"{calibration}: {calibrated.n_scans} calibration scans cannot give a mask at FDR {fdr} (needs {needed})"
            raise CalibrationError(msg)
    inferencer = VolumeInferencer(model, device=device, precision=precision)
    threshold = _resolve_threshold(threshold, inferencer, model)
    settings = {
        "threshold": threshold,
        "fdr": fdr,
        "fdr_level": level,  # the BH level actually used (lower than fdr where the calibration scans need it)
        "calibration": None if calibration is None else str(calibration),
    }
    report = PredictionReport(output=output)
    with _terminate_unwinds():
        output.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned_staging(output)
        staging = output.parent / f"{_staging_prefix(output)}{os.getpid()}-{uuid.uuid4().hex[:12]}"
        # One thread compresses and writes each scan's maps while the next scan is read and run (zlib
        # releases the GIL): on a small CPU, writing then costs a scan almost no time of its own.
        writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="predict-writer")
        pending: Future | None = None
        try:
            # The writer's one thread starts before the staging folder exists: a thread started inside a
            # later submit() that a signal interrupts is never joined by shutdown(), and its write would
            # make the staging folder again after the cleanup below.
            writer.submit(int).result()
            staging.mkdir()
            for scan in tqdm(scans, desc="predict", unit="scan", disable=not progress):
                try:
                    prediction = inferencer.predict(scan.image_path, brain_mask_path=scan.brain_mask_path)
                except (VolumeError, ModelOutputError) as error:
                    if fail_fast:
                        raise
                    logger.error("skipped %s", error)
                    report.failed.append({"scan": str(scan.image_path), "error": str(error)})
                    continue
                if prediction.geometry.file_shape is not None:
                    logger.info(
                        "%s: resampled to the model's %g mm voxels; the map is written on the scan's own grid",
                        scan.image_path,
                        inferencer.preprocessing.spacing_mm,
                    )
                decision = _decide(prediction, threshold, calibrated, fdr)
                staged = output_paths(
                    scan, staging, mask=decision.mask is not None, pvalues=calibrated is not None, preview=previews
                )
                if pending is not None:
                    pending.result()  # one scan's maps in flight at most; a failed write stops the batch here
                pending = writer.submit(_write_outputs, prediction, decision, staged)
                report.scans.append(_record(scan, prediction, decision, calibrated, staged, output))
            if pending is not None:
                pending.result()
            for name, text in _summaries(report, model, settings).items():
                atomic_write_text(staging / name, text)
            with _signals_deferred():
                replace_directory(staging, output)
        finally:
            try:
                writer.shutdown(wait=True, cancel_futures=True)  # nothing writes into the staging folder once it goes
            finally:
                with _signals_deferred():  # a second Ctrl-C must not cut the cleanup short
                    shutil.rmtree(staging, ignore_errors=True)  # nothing left after a success: it became the output
    return report
