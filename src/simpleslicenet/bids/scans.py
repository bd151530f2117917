"""One subject of the BIDS App's participant level: run the model on its scans and write its folder atomically.

:class:`SubjectRunner` holds one loaded model (one per worker process) and the mask rule. For a subject it
builds the whole ``sub-XX/`` folder under a hidden staging name (:func:`simpleslicenet.atomic.staged_directory`):
files of scans finished before are carried over as hard links, each scan to (re)do is predicted and its maps,
sidecars and report written, and the staging folder then replaces ``sub-XX/`` in one step. An interrupted
subject leaves its previous folder exactly as it was. A scan the reader refuses or on which the model gives no
finite map is recorded as failed and its subject's other scans go on.

On Ray, :func:`ray_subject` is one subject's task: the same runner, kept in the Ray worker process between
tasks (one model load per worker). A subject predicted where the output folder is not (a node of a cluster
without it) is written in a scratch folder there and put in place here by :func:`store_subject`.

A scan's report outlines its true lesion when the dataset has a lesion mask for it (brought to the model grid
as the model input is); the mask changes nothing else.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from simpleslicenet.atomic import atomic_write_json, atomic_write_text, staged_directory
from simpleslicenet.bids.derivatives import ScanNames, sidecars, software_versions
from simpleslicenet.calibration import model_digest
from simpleslicenet.data.bids import BidsDataset, BidsScan, sidecar_path
from simpleslicenet.data.geometry import crop_or_pad, to_slices
from simpleslicenet.data.nifti import VolumeError, read_mask
from simpleslicenet.deploy.inferencer import VolumeInferencer, VolumePrediction
from simpleslicenet.deploy.loading import ModelOutputError
from simpleslicenet.deploy.masks import MaskRule
from simpleslicenet.deploy.predict import predict_scan
from simpleslicenet.executors import folder_files, store_files
from simpleslicenet.reports import cluster_records, grid_affine, render_subject_report
from simpleslicenet.scan_outputs import write_scan_outputs

__all__ = ["ParticipantOptions", "SubjectJob", "SubjectResult", "SubjectRunner", "ray_subject", "store_subject"]

logger = logging.getLogger(__name__)

_STAGING_TAG = "bids"


@dataclass(frozen=True)
class ParticipantOptions:
    """What the participant level does with each scan (plain values: it travels to worker processes as JSON).

    Args:
        model: Exported ``.xml`` or ``.ckpt``.
        calibration: The model's calibration file (p-value maps, volume p-values), or ``None``.
        fdr: False discovery rate of the mask (needs ``calibration``), or ``None``.
        threshold: Score threshold of the mask (``"val"``: the model's validation threshold), or ``None``.
        suffix: Contrast read (``"T2w"``).
        session: Only this session.
        acquisition: Only scans with this ``acq`` entity.
        run: Only scans with this ``run`` index.
        derivatives: Read the preprocessed scans of this pipeline folder under ``derivatives/`` instead of raw ones.
        reports: Write each scan's HTML report.
        precision: OpenVINO precision.
        device: OpenVINO device or torch device.
    """

    model: str
    calibration: str | None = None
    fdr: float | None = None
    threshold: float | str | None = None
    suffix: str = "T2w"
    session: str | None = None
    acquisition: str | None = None
    run: str | None = None
    derivatives: str | None = None
    reports: bool = True
    precision: str = "f32"
    device: str = "CPU"

    def to_dict(self) -> dict[str, Any]:
        """As JSON-able values."""
        return asdict(self)

    def dataset(self, bids_root: str | os.PathLike) -> BidsDataset:
        """The BIDS dataset these options read."""
        return BidsDataset(
            bids_root, suffix=self.suffix, session=self.session, acquisition=self.acquisition, run=self.run,
            derivatives=self.derivatives,
        )  # fmt: skip


@dataclass
class SubjectJob:
    """One subject's work: which of its scans to (re)do, and which files of its folder not to carry over.

    Args:
        subject: Participant label (no ``sub-``).
        scans: Names of the scans to predict.
        drop: Paths relative to the output folder that belong to those scans (their previous outputs).
    """

    subject: str
    scans: list[str]
    drop: list[str] = field(default_factory=list)


@dataclass
class SubjectResult:
    """What one subject's job did.

    Args:
        subject: Participant label.
        done: Per finished scan: ``name``, ``outputs`` (kind -> path relative to the output folder),
            ``volume_score``, ``volume_pvalue``, ``seconds``.
        failed: Per failed scan: ``name`` and ``error``.
    """

    subject: str
    done: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)


def _keep_previous(target: Path, staging: Path, drop: set[str], output: Path) -> None:
    """Carry the files of ``target`` over into ``staging`` (hard links where possible), except ``drop``."""
    if not target.is_dir():
        return
    for path in sorted(target.rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        if path.relative_to(output).as_posix() in drop:
            continue
        destination = staging / path.relative_to(target)
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, destination)
        except OSError:
            shutil.copy2(path, destination)


def store_subject(output: str | os.PathLike, job: SubjectJob, files: dict[str, bytes]) -> None:
    """Put a subject predicted elsewhere in place: its previous folder's files kept, the new ones added, atomically.

    The counterpart of :meth:`SubjectRunner.run_subject` for a job run where ``output`` is not (a Ray worker
    on another machine, into a scratch folder of its own): the same folder results, swapped in as a whole.

    Args:
        output: The derivatives folder.
        job: The job that was run (its ``drop`` files are not carried over).
        files: The new ``sub-XX/`` folder's files, relative to it (:func:`simpleslicenet.executors.folder_files`).
    """
    output = Path(output)
    target = output / f"sub-{job.subject}"
    with staged_directory(target, _STAGING_TAG) as staging:
        _keep_previous(target, staging, set(job.drop), output)
        store_files(staging, files)
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()  # every scan failed and nothing was there before


class SubjectRunner:
    """Runs one model on the scans of a BIDS dataset, subject by subject, into a derivatives folder.

    Args:
        bids_root: The BIDS dataset.
        output: The derivatives folder.
        options: What to do with each scan.
        dataset: The dataset as read with ``options`` (read again when ``None``).

    Raises:
        ModelFileError: The model cannot be used.
        CalibrationError: An unusable calibration, or options that contradict it.
        BidsError: The dataset cannot be read.
    """

    def __init__(
        self,
        bids_root: str | os.PathLike,
        output: str | os.PathLike,
        options: ParticipantOptions,
        dataset: BidsDataset | None = None,
    ) -> None:
        self.bids_root = Path(bids_root).resolve()
        self.output = Path(output).resolve()
        self.options = options
        rule = MaskRule.from_options(options.model, options.threshold, options.calibration, options.fdr)
        self.inferencer = VolumeInferencer(options.model, device=options.device, precision=options.precision)
        self.rule = rule.resolved(self.inferencer.metadata, options.model)
        dataset = dataset or options.dataset(self.bids_root)
        self.scans = {scan.name: scan for scan in dataset.scans()}
        self.model_sha256 = model_digest(options.model)
        self.calibration_sha256 = None if options.calibration is None else model_digest(options.calibration)
        self.software = software_versions()

    # -- one subject -------------------------------------------------------------------------------
    def run_job(self, job: SubjectJob, output: str | os.PathLike | None = None) -> SubjectResult:
        """:meth:`run_subject`; an unexpected error fails the job's scans (logged with its traceback) instead."""
        try:
            return self.run_subject(job, output)
        except Exception as error:  # noqa: BLE001 - one subject's failure is reported, the others go on
            logger.exception("sub-%s failed", job.subject)
            problem = f"sub-{job.subject}: {type(error).__name__}: {error}"
            return SubjectResult(job.subject, failed=[{"name": name, "error": problem} for name in job.scans])

    def run_subject(self, job: SubjectJob, output: str | os.PathLike | None = None) -> SubjectResult:
        """Predict the job's scans and replace the subject's folder with the complete new one.

        Args:
            job: The subject and its scans.
            output: The derivatives folder to write into, if not the runner's own (a scratch folder).
        """
        output = self.output if output is None else Path(output)
        result = SubjectResult(job.subject)
        target = output / f"sub-{job.subject}"
        with staged_directory(target, _STAGING_TAG) as staging:
            _keep_previous(target, staging, set(job.drop), output)
            for name in job.scans:
                start = time.perf_counter()
                scan = self.scans.get(name)
                if scan is None:
                    result.failed.append({"name": name, "error": f"{name}: no longer in the BIDS dataset"})
                    continue
                try:
                    record = self.run_scan(scan, staging)
                except (VolumeError, ModelOutputError) as error:
                    logger.error("failed %s", error)
                    result.failed.append({"name": name, "error": str(error)})
                    continue
                result.done.append({
                    "name": name,
                    "outputs": self._written(record),
                    "volume_score": record["volume_score"],
                    "volume_pvalue": record["volume_pvalue"],
                    "seconds": round(time.perf_counter() - start, 2),
                })  # fmt: skip
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()  # every scan failed and nothing was there before
        return result

    # -- one scan ----------------------------------------------------------------------------------
    def run_scan(self, scan: BidsScan, staging: Path) -> dict[str, Any]:
        """Predict one scan and write its files into the subject's staging folder; returns its record.

        Raises:
            VolumeError: The reader refuses the scan.
            ModelOutputError: The model gives no finite map for it.
        """
        names = ScanNames(scan)
        subject_folder = Path(f"sub-{scan.subject}")
        prediction, outputs = predict_scan(self.inferencer, self.rule, scan.files(), file_names=names.file_names())
        mask, pvalues = outputs.mask, outputs.pvalues
        write_scan_outputs(outputs, staging / names.folder.relative_to(subject_folder))
        record = self.record(scan, names, prediction, mask, pvalues)
        for relative, content in sidecars(names, self.bids_root, record, self._skull_stripped(scan)).items():
            atomic_write_json(staging / relative.relative_to(subject_folder), content)
        if self.options.reports:
            calibration = self.rule.calibration
            page = render_subject_report(
                record,
                image=prediction.model_image,
                brain=prediction.brain_mask,
                score_map=prediction.model_map,
                pvalue_map=pvalues,
                mask=mask,
                affine=grid_affine(prediction.geometry),
                calibration_scores=None if calibration is None else calibration.volume_scores.tolist(),
                lesion=self._model_grid_lesion(scan, prediction),
            )
            atomic_write_text(staging / names.report.relative_to(subject_folder), page)
        return record

    def _model_grid_lesion(self, scan: BidsScan, prediction: VolumePrediction) -> np.ndarray | None:
        """The scan's true lesion on the model grid ``[D, H, W]``, for its report; ``None`` when it has no mask.

        Read on the scan's grid (resampled as the scan was) and cut with the model input's box, as
        :func:`~simpleslicenet.data.volume.load_volume` cuts a lesion mask; unlike there it does not widen
        the brain, so the prediction stays the one made without it. A mask that cannot be read is logged
        and left out: it changes only the report's outline.
        """
        if scan.mask_path is None:
            return None
        geometry = prediction.geometry
        try:
            lesion = read_mask(scan.mask_path, geometry, self.inferencer.preprocessing.spacing_mm)
        except VolumeError as error:
            logger.warning("report of %s shows no true lesion: %s", scan.name, error)
            return None
        if geometry.target_shape is not None:
            lesion = crop_or_pad(lesion, tuple(geometry.crop_start), tuple(geometry.target_shape))
        return to_slices(lesion).astype(bool)

    @staticmethod
    def _written(record: dict[str, Any]) -> dict[str, str]:
        """Every file written for a scan (kind -> path relative to the output folder), sidecars included."""
        written = {}
        for kind, path in record["files"].items():
            if path is None:
                continue
            written[kind] = path
            if path.endswith(".nii.gz"):
                written[f"{kind}_sidecar"] = sidecar_path(path).as_posix()
        return written

    def _skull_stripped(self, scan: BidsScan) -> bool:
        # A preprocessed derivative is the extracted brain; a raw scan is as acquired.
        return scan.image_path != scan.source_path

    def record(
        self,
        scan: BidsScan,
        names: ScanNames,
        prediction: VolumePrediction,
        mask: np.ndarray | None,
        pvalues: np.ndarray | None,
    ) -> dict[str, Any]:
        """The scan's record: the map sidecar's ``SimpleSliceNet`` block, rendered by its report."""
        geometry = prediction.geometry
        calibration = self.rule.calibration
        clusters = [] if mask is None else cluster_records(mask, prediction.model_map, pvalues, geometry)
        metadata = self.inferencer.metadata
        return {
            "scan": scan.name,
            "subject": scan.subject,
            "session": scan.session,
            "suffix": scan.suffix,
            "source": Path(os.path.relpath(scan.source_path, self.bids_root)).as_posix(),
            "image": str(scan.image_path),
            "model": {
                "path": str(Path(self.options.model).resolve()),
                "sha256": self.model_sha256,
                "name": str(metadata.get("class_path", "")).rsplit(".", 1)[-1],
                "settings": {key: value for key, value in metadata.items() if key != "preprocessing"},
            },
            "preprocessing": self.inferencer.preprocessing.to_dict(),
            "calibration": None
            if calibration is None
            else {
                "path": str(Path(self.options.calibration).resolve()),
                "sha256": self.calibration_sha256,
                "n_scans": calibration.n_scans,
            },
            "fdr": self.rule.fdr,
            "fdr_level": self.rule.fdr_level,
            "threshold": self.rule.threshold,
            "volume_score": prediction.volume_score,
            "volume_pvalue": None if calibration is None else calibration.volume_pvalue(prediction.volume_score),
            "slice_scores": [float(s) for s in prediction.slice_scores],
            "voxel_ml": geometry.voxel_ml,
            "clusters": clusters,
            "flagged_ml": None if mask is None else round(sum(c["size_ml"] for c in clusters), 4),
            "space": names.space,
            "files": {
                "map": names.map.as_posix(),
                "pvalue_map": None if pvalues is None else names.pvalue_map.as_posix(),
                "mask": None if mask is None else names.mask.as_posix(),
                "report": names.report.as_posix() if self.options.reports else None,
            },
            "software": self.software,
        }


# This process's runner, by the setup it was made for (a Ray worker process serves one run at a time).
_RUNNERS: dict[str, SubjectRunner] = {}


def _cached_runner(setup: dict[str, Any]) -> SubjectRunner:
    """This process's runner for ``setup``, made (its model loaded) on first use."""
    key = json.dumps({name: setup[name] for name in ("bids_root", "options")}, sort_keys=True)
    if key not in _RUNNERS:
        _RUNNERS.clear()  # another run's model is not needed any more
        _RUNNERS[key] = SubjectRunner(setup["bids_root"], setup["output"], ParticipantOptions(**setup["options"]))
    return _RUNNERS[key]


def ray_subject(setup: dict[str, Any], job: dict[str, Any], shared: bool) -> dict[str, Any]:
    """The body of one Ray task: predict one subject's scans and write its folder.

    Args:
        setup: ``bids_root``, ``output`` and ``options`` (:class:`ParticipantOptions` as a dict), with
            absolute paths: the dataset, the model and the calibration must be at these paths on every node.
        job: A :class:`SubjectJob` as a dict.
        shared: Whether ``output`` is at the same path on this node. If not, the subject is written in a
            scratch folder here and its files are returned, for :func:`store_subject` on the caller's side.

    Returns:
        ``result`` (a :class:`SubjectResult` as a dict) and ``files`` (``None`` when ``shared``; else the new
        ``sub-XX/`` folder's files, path relative to it -> bytes).
    """
    runner = _cached_runner(setup)
    subject_job = SubjectJob(**job)
    if shared:
        return {"result": asdict(runner.run_job(subject_job, output=setup["output"])), "files": None}
    scratch = Path(tempfile.mkdtemp(prefix="simpleslicenet-bids-"))
    try:
        result = runner.run_job(subject_job, output=scratch)
        return {"result": asdict(result), "files": folder_files(scratch / f"sub-{subject_job.subject}", None)}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
