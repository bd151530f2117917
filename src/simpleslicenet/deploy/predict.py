"""``simpleslicenet predict``: anomaly maps for one scan or a folder of scans, one transaction per batch.

* **Which files are scans** follows the dataset naming rule (:func:`simpleslicenet.data.scans.scans_from`):
  masks, hidden files and the command's own outputs are never read as scans. The scans can also be given
  as a list of :class:`~simpleslicenet.data.scans.ScanFiles`, e.g. a BIDS dataset's participants chosen by
  a selection spec (:func:`bids_scan_files`); everything after that is the same.
* **A bad scan does not stop the batch.** A scan the reader refuses (:class:`~simpleslicenet.data.nifti.VolumeError`)
  or on which the model gives no finite map (:class:`~simpleslicenet.deploy.loading.ModelOutputError`) is
  reported, skipped and listed under ``"failed"`` in ``scores.json``; the command then exits non-zero.
  ``fail_fast`` (``--fail-fast``) stops at the first one instead, and nothing is written.
* **All or nothing.** Maps and summaries are written into a hidden staging folder beside the output
  folder, which replaces the output folder only once every scan has been handled
  (:func:`simpleslicenet.atomic.staged_directory`). A batch that fails or is interrupted (Ctrl-C or
  SIGTERM) leaves the previous output folder exactly as it was and removes its staging folder; a
  staging folder left by a killed process is removed by the next run. The output folder therefore
  always holds one complete batch: no new maps beside stale ones, no half-written file.
* **The files** of each scan are those of the models' test-time writer, written by the same code
  (:mod:`simpleslicenet.scan_outputs`); ``scores.json`` (strict JSON: never NaN or Infinity) and
  ``scores.csv`` summarise the batch (:mod:`simpleslicenet.deploy.report`).
* **Label-free outputs** with a calibration (:mod:`simpleslicenet.calibration`, from ``simpleslicenet
  calibrate`` on healthy scans): a voxel p-value map per scan, masks by Benjamini–Hochberg at a false
  discovery rate (``fdr``; at a lower level where the healthy calibration scans need it, see
  :mod:`simpleslicenet.deploy.masks`), and ``scores.csv`` ranked by each scan's volume p-value, most
  suspicious first, with the number and sizes of its flagged clusters.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from simpleslicenet.atomic import atomic_write_text, leave_stop_signals_to_the_main_thread, staged_directory
from simpleslicenet.data.bids import BidsDataset, BidsError
from simpleslicenet.data.nifti import VolumeError
from simpleslicenet.data.scans import ScanFiles, scans_from
from simpleslicenet.deploy.inferencer import VolumeInferencer, VolumePrediction
from simpleslicenet.deploy.loading import ModelOutputError
from simpleslicenet.deploy.masks import MaskRule
from simpleslicenet.deploy.progress import progress_rows
from simpleslicenet.deploy.report import SUMMARY_FILES, PredictionReport
from simpleslicenet.scan_outputs import OUTPUT_FILES, ScanOutputs, one_write_in_flight, output_paths, write_scan_outputs

__all__ = ["predict_paths", "predict_scan", "input_scans", "bids_scan_files"]

logger = logging.getLogger(__name__)

_STAGING_TAG = "predict"
SCANS_AT_ONCE = 2


def input_scans(inputs: str | os.PathLike | Iterable[ScanFiles]) -> list[ScanFiles]:
    """The scans to run on: a scan file or folder by the naming rule, or the given scans as they are.

    Args:
        inputs: A scan, a folder of scans, or :class:`ScanFiles` (``BidsScan.files()`` gives them).

    Raises:
        VolumeError: No such scan or folder, a folder without scans, an empty list, or two scans of one
            name (their outputs would be written over each other).
    """
    if isinstance(inputs, str | os.PathLike):
        return scans_from(inputs)
    scans = list(inputs)
    if not scans:
        raise VolumeError(None, "no scans given")
    seen: dict[str, Path] = {}
    for scan in scans:
        if scan.name in seen:
            raise VolumeError(scan.image_path, f"the same scan name {scan.name!r} as {seen[scan.name]}")
        seen[scan.name] = scan.image_path
    return scans


def bids_scan_files(
    root: str | os.PathLike,
    participants: str | Sequence[str] | None = None,
    suffix: str = "T2w",
    session: str | None = None,
    acquisition: str | None = None,
    run: str | int | None = None,
    derivatives: str | None = None,
    lesion_masks: str | None = "auto",
) -> list[ScanFiles]:
    """A BIDS dataset's scans of the chosen participants, for :func:`predict_paths` and ``calibrate_paths``.

    Args:
        root: The BIDS dataset.
        participants: Selection spec (``"group=reference"``, a list of labels, ``None``: all).
        suffix: The contrast.
        session: Only this session.
        acquisition: Only scans with this ``acq`` entity.
        run: Only scans with this ``run`` index.
        derivatives: Read the preprocessed scans of this derivatives folder (e.g. ``"simpleslicenet-preprocess"``)
            instead of the raw ones.
        lesion_masks: Where lesion and brain masks come from (see :class:`~simpleslicenet.data.bids.BidsDataset`;
            ``"auto"`` with ``derivatives``: that folder's own masks only, on its scans' grid).

    Raises:
        BidsError: The dataset cannot be read, the selection is unknown, or it holds no scan.
    """
    dataset = BidsDataset(
        root, suffix=suffix, session=session, acquisition=acquisition, run=run,
        derivatives=derivatives, lesion_masks=lesion_masks,
    )  # fmt: skip
    scans = dataset.scans(participants)
    if not scans:
        chosen = "" if participants is None else f" of the participants chosen ({participants})"
        where = f" in derivatives/{derivatives}" if derivatives is not None else ""
        raise BidsError(root, f"no {suffix} scans{where}{chosen}")
    return [scan.files() for scan in scans]


def predict_scan(
    inferencer: VolumeInferencer,
    rule: MaskRule,
    scan: ScanFiles,
    file_names: dict[str, str] | None = None,
) -> tuple[VolumePrediction, ScanOutputs]:
    """Run the model on one scan and apply the mask rule: what ``predict`` and the BIDS App write for it.

    Args:
        inferencer: The loaded model.
        rule: The mask rule, resolved for this model (:meth:`MaskRule.resolved`).
        scan: The scan (its brain mask, when it has one, is used instead of the one derived from intensities).
        file_names: File names of the outputs where the default ``NAME`` + suffix does not fit
            (:class:`~simpleslicenet.scan_outputs.ScanOutputs`).

    Returns:
        The prediction and the scan's outputs on the model grid (map, p-values and mask as the rule asks,
        the image and brain mask for a preview), ready for :func:`~simpleslicenet.scan_outputs.write_scan_outputs`.

    Raises:
        VolumeError: The reader refuses the scan.
        ModelOutputError: The model gives no finite map for it.
    """
    prediction = inferencer.predict(scan.image_path, brain_mask_path=scan.brain_mask_path)
    mask, pvalues = rule.apply(prediction.model_map, prediction.brain_mask)
    outputs = ScanOutputs(
        name=scan.name,
        geometry=prediction.geometry,
        model_map=prediction.model_map,
        scan_map=prediction.anomaly_map,
        mask=mask,
        pvalues=pvalues,
        image=prediction.model_image,
        brain=prediction.brain_mask,
        title=f"{scan.name}: volume score {prediction.volume_score:.4g}",
        file_names=file_names,
    )
    return prediction, outputs


def _is_predict_output(path: Path) -> bool:
    if not path.is_file() or path.is_symlink():
        return False
    return path.name in SUMMARY_FILES or path.name.endswith(tuple(OUTPUT_FILES.values()))


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


@contextmanager
def _scans_in_flight(
    inferencer: VolumeInferencer, rule: MaskRule, scans: Sequence[ScanFiles]
) -> Iterator[Iterator[tuple[ScanFiles, Future]]]:
    """The scans in order, each with its :func:`predict_scan` future, as many in flight as the model runs at once.

    One at a time, each scan runs in the calling thread when its future is yielded. Every scan has
    finished, or was cancelled, when the block is left.
    """
    in_flight = inferencer.streams
    if in_flight == 1:
        yield ((scan, _run_here(predict_scan, inferencer, rule, scan)) for scan in scans)
        return
    pool = ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="predict-scan", initializer=leave_stop_signals_to_the_main_thread)
    pending: deque[tuple[ScanFiles, Future]] = deque()

    def in_order() -> Iterator[tuple[ScanFiles, Future]]:
        for scan in scans:
            pending.append((scan, pool.submit(predict_scan, inferencer, rule, scan)))
            if len(pending) == in_flight:
                yield pending.popleft()
        while pending:
            yield pending.popleft()

    try:
        yield in_order()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _run_here(function: Callable[..., object], *args: object) -> Future:
    """``function(*args)`` run now, as a finished future (an exception is kept for ``result()`` to raise)."""
    future: Future = Future()
    try:
        future.set_result(function(*args))
    except Exception as error:  # noqa: BLE001 - handed over exactly as a pool's future would
        future.set_exception(error)
    return future


def predict_paths(
    model: str | os.PathLike,
    inputs: str | os.PathLike | Iterable[ScanFiles],
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
        inputs: A scan, a folder of scans, or the scans themselves (:func:`input_scans`).
        output: Output folder: new, empty, or holding a previous batch's outputs only.
        threshold: Also write ``<scan>_anomaly_mask.nii.gz`` of voxels whose score reaches it; ``"val"``
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
        VolumeError: The input is not a scan or a folder of scans (or holds none), or (``fail_fast``) a scan is bad.
        ModelFileError: The model cannot be used (:class:`~simpleslicenet.deploy.loading.ModelOutputError`
            with ``fail_fast`` when it gives no finite map for a scan).
    """
    scans = input_scans(inputs)
    output = Path(output)
    if output.name in {"", ".", ".."}:
        output = output.resolve()  # the staging folder is named after the output folder
    _check_output_folder(output, overwrite)
    rule = MaskRule.from_options(model, threshold, calibration, fdr)
    # Two scans at a time, each graph on half the cores: one scan's reading, scoring and writing then
    # overlap the other's graph, and a graph on fewer cores waits less on their synchronisation.
    inferencer = VolumeInferencer(model, device=device, precision=precision, streams=SCANS_AT_ONCE)
    rule = rule.resolved(inferencer.metadata, model)
    report = PredictionReport(output=output)
    with staged_directory(output, _STAGING_TAG) as staging:
        with one_write_in_flight() as submit, _scans_in_flight(inferencer, rule, scans) as predicted:
            for scan, future in progress_rows(predicted, progress, total=len(scans), desc="predict", unit="scan"):
                try:
                    prediction, outputs = future.result()
                except (VolumeError, ModelOutputError) as error:
                    if fail_fast:
                        raise
                    logger.error("skipped %s", error)
                    report.add_failure(scan.image_path, error)
                    continue
                if prediction.geometry.file_shape is not None:
                    logger.info(
                        "%s: resampled to the model's %g mm voxels; the map is written on the scan's own grid",
                        scan.image_path,
                        inferencer.preprocessing.spacing_mm,
                    )
                submit(write_scan_outputs, outputs, staging, previews)
                paths = output_paths(output, outputs, previews)
                report.add_scan(scan.image_path, prediction, outputs.mask, rule.calibration, paths)
        for name, text in report.summaries(model, rule.settings()).items():
            atomic_write_text(staging / name, text)
    return report
