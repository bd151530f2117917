"""Preprocess many scans: find them, skip finished ones, run the rest in parallel, report.

:func:`preprocess_inputs` takes NIfTI files, DICOM series folders and folders of either, and writes
one output per scan into the output folder, keeping sub-folders, so a tree laid out for
:class:`~simpleslicenet.data.datamodules.folder.NiftiFolder` comes out laid out the same way. Scans
run in worker processes (``workers``); a scan that fails is reported with its reason and the batch
goes on; the manifest (:mod:`.manifest`) makes a rerun skip what is finished. Every scan gets one log
line with its registration-quality figures, and the batch ends with a summary table.

:func:`preprocess_jobs` runs any list of :class:`ScanJob`; a job may name its outputs itself and ask for
JSON sidecars beside them, which is how a BIDS dataset's scans become a derivatives dataset (:mod:`.bids`)
through the same batch, manifest and reports.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simpleslicenet.atomic import atomic_write_json
from simpleslicenet.data.bids import sidecar_path
from simpleslicenet.data.nifti import VolumeError
from simpleslicenet.data.preprocess.dicom import dicom_series_folders, is_dicom_file
from simpleslicenet.data.preprocess.manifest import Manifest, file_fingerprint
from simpleslicenet.data.preprocess.scan import PreprocessResult, PreprocessSettings, output_paths, preprocess_scan
from simpleslicenet.data.scans import ScanFiles, companion_file, list_scans, scans_from

__all__ = [
    "ScanJob",
    "ScanOutcome",
    "BatchReport",
    "find_jobs",
    "preprocess_jobs",
    "preprocess_inputs",
    "preprocess_folder",
]

DONE, SKIPPED, FAILED = "done", "skipped", "failed"


@dataclass(frozen=True)
class ScanJob:
    """One scan to preprocess.

    Args:
        name: Output scan path relative to the output folder (``sub/NAME.nii.gz``).
        source: The NIfTI file or DICOM series folder.
        mask_path: Its lesion mask (NIfTI scans), if any.
        brain_mask_path: Its own brain mask (NIfTI scans), if any.
        output_names: File names of its other outputs by kind, beside the scan, instead of the naming
            rule's (:func:`~simpleslicenet.data.preprocess.scan.output_paths`).
        sidecars: JSON written beside outputs once the scan is done, by the output's kind
            (``image``, ``brain_mask``, ``lesion_mask``): ``NAME.json`` for ``NAME.nii.gz``.
    """

    name: str
    source: Path
    mask_path: Path | None = None
    brain_mask_path: Path | None = None
    output_names: Mapping[str, str] | None = field(default=None, hash=False)
    sidecars: Mapping[str, Mapping[str, Any]] | None = field(default=None, hash=False)

    def input_files(self) -> list[Path]:
        """Every file the outputs depend on: the scan (or each file of the series) and its masks."""
        if self.source.is_dir():
            files = sorted(p for p in self.source.iterdir() if p.is_file() and not p.name.startswith("."))
        else:
            files = [self.source]
        return files + [p for p in (self.mask_path, self.brain_mask_path) if p is not None]

    def output_paths(self, output: Path, settings: PreprocessSettings) -> dict[str, Path]:
        """Every file the job writes into ``output``, by kind, sidecars as ``<kind>_sidecar``."""
        has_lesion = self.mask_path is not None and not settings.dicom_only
        paths = output_paths(output / self.name, settings, has_lesion, self.output_names).as_dict()
        for kind in self.sidecars or {}:
            if kind in paths:
                paths[f"{kind}_sidecar"] = sidecar_path(paths[kind])
        return paths

    def write_sidecars(self, result: PreprocessResult) -> None:
        """Write the sidecars of the outputs ``result`` holds, and record them in it."""
        written = result.outputs()
        for kind, record in (self.sidecars or {}).items():
            if kind in written:
                path = sidecar_path(written[kind])
                atomic_write_json(path, record)
                result.sidecars[kind] = path


@dataclass
class ScanOutcome:
    """What happened to one scan.

    Args:
        name: Output name (relative to the output folder) or, for inputs that never became a job, the input.
        source: The input.
        status: ``"done"``, ``"skipped"`` (finished before, unchanged) or ``"failed"``.
        seconds: Time spent on it.
        mutual_information: Final Mattes mutual information with the template.
        template_dice: Dice of its brain mask with the template's.
        error: Why it failed.
        result: The files written (``"done"`` only).
    """

    name: str
    source: str
    status: str
    seconds: float = 0.0
    mutual_information: float | None = None
    template_dice: float | None = None
    error: str | None = None
    result: PreprocessResult | None = None


@dataclass
class BatchReport:
    """All outcomes of a batch.

    Args:
        outcomes: One per scan (and one per input that could not be read at all), in input order
            once the batch has finished.
        manifest_path: The manifest written.
    """

    outcomes: list[ScanOutcome] = field(default_factory=list)
    manifest_path: Path | None = None

    def by_status(self, status: str) -> list[ScanOutcome]:
        """Outcomes with the given status."""
        return [outcome for outcome in self.outcomes if outcome.status == status]

    @property
    def failed(self) -> list[ScanOutcome]:
        """Outcomes that failed."""
        return self.by_status(FAILED)

    def table(self) -> str:
        """The summary table: one row per scan, then the totals."""
        header = ("scan", "status", "seconds", "MI", "Dice vs MNI mask", "problem")
        rows = [
            (
                outcome.name,
                outcome.status,
                f"{outcome.seconds:.1f}",
                "-" if outcome.mutual_information is None else f"{outcome.mutual_information:.3f}",
                "-" if outcome.template_dice is None else f"{outcome.template_dice:.3f}",
                outcome.error or "",
            )
            for outcome in self.outcomes
        ]
        widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header) - 1)]
        lines = []
        for row in [header, tuple("-" * w for w in widths) + ("",), *rows]:
            cells = [str(cell).ljust(width) for cell, width in zip(row[:-1], widths, strict=True)]
            lines.append("  ".join(cells + [row[-1]]).rstrip())
        counts = ", ".join(f"{len(self.by_status(s))} {s}" for s in (DONE, SKIPPED, FAILED))
        lines.append(f"{len(self.outcomes)} scans: {counts}; manifest: {self.manifest_path}")
        return "\n".join(lines)


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def find_jobs(
    inputs: Iterable[str | os.PathLike], output: str | os.PathLike, dicom_only: bool = False
) -> tuple[list[ScanJob], list[ScanOutcome]]:
    """Turn inputs into scan jobs; inputs that cannot become jobs come back as failed outcomes.

    A NIfTI file becomes ``NAME.nii.gz`` at the top of the output folder; a DICOM series folder
    becomes ``FOLDER.nii.gz``; a folder of scans keeps its layout: ``sub/NAME.nii.gz`` for its NIfTI
    scans (masks beside them by the naming rule, or BraTS's ``SUBJECT/SUBJECT_seg`` for each
    ``SUBJECT/SUBJECT_<modality>``, written as ``SUBJECT_<modality>_mask``) and ``sub/SERIES.nii.gz``
    for each folder of DICOM files below it. Anything inside the output folder is left out, so outputs are never re-read as inputs.

    Args:
        inputs: Files and folders.
        output: The output folder.
        dicom_only: Take DICOM series only (a NIfTI file named directly is reported as a failure).
    """
    output = Path(output)
    jobs: list[ScanJob] = []
    failures: list[ScanOutcome] = []
    seen: dict[str, Path] = {}

    def add(job: ScanJob) -> None:
        if _inside(job.source, output):
            return
        if job.name in seen:
            problem = f"same output name {job.name} as {seen[job.name]}; rename one of them"
            failures.append(ScanOutcome(job.name, str(job.source), FAILED, error=problem))
            return
        seen[job.name] = job.source
        jobs.append(job)

    for item in inputs:
        path = Path(item)
        try:
            if path.is_dir():
                found = _jobs_in_folder(path, dicom_only)
                if not found:
                    raise VolumeError(path, "holds no NIfTI scans and no DICOM series")
                for job in found:
                    add(job)
            elif path.is_file() and is_dicom_file(path):
                raise VolumeError(path, "a single DICOM file: give the folder of its series instead")
            elif path.is_file():
                if dicom_only:
                    raise VolumeError(path, "not a DICOM series folder (DICOM-only mode converts DICOM series)")
                (scan,) = scans_from(path)
                add(ScanJob(f"{scan.name}.nii.gz", path, scan.mask_path, scan.brain_mask_path))
            else:
                raise VolumeError(path, "no such file or folder")
        except VolumeError as error:
            failures.append(ScanOutcome(str(path), str(path), FAILED, error=str(error)))
    return jobs, failures


def _brats_segmentation(scan: ScanFiles) -> Path | None:
    """``SUBJECT/SUBJECT_seg.nii.gz`` beside a scan ``SUBJECT/SUBJECT_<modality>``: the BraTS layout's lesion mask."""
    subject = scan.image_path.parent.name
    if not scan.name.startswith(f"{subject}_") or scan.name == f"{subject}_seg":
        return None
    return companion_file(scan.image_path.parent, f"{subject}_seg")


def _jobs_in_folder(folder: Path, dicom_only: bool) -> list[ScanJob]:
    jobs = []
    if not dicom_only:
        scans = list_scans(folder, recursive=True)
        # BraTS layout: SUBJECT_seg is the lesion mask of every SUBJECT_<modality> beside it, not a scan.
        segmentations = {seg for seg in map(_brats_segmentation, scans) if seg is not None}
        for scan in scans:
            if scan.image_path in segmentations:
                continue
            relative = scan.image_path.parent.relative_to(folder)
            name = str(relative / f"{scan.name}.nii.gz")
            mask = scan.mask_path or _brats_segmentation(scan)
            jobs.append(ScanJob(name, scan.image_path, mask, scan.brain_mask_path))
    for series in dicom_series_folders(folder):
        name = folder.name if series == folder else str(series.relative_to(folder))
        jobs.append(ScanJob(f"{name}.nii.gz", series))
    return jobs


def _fingerprint(job: ScanJob) -> list[dict]:
    return [file_fingerprint(path) for path in job.input_files()]


def _run_job(job: ScanJob, output: Path, settings: PreprocessSettings) -> ScanOutcome:
    """Preprocess one job; never raises (an exception would have to be pickled back from a worker)."""
    start = time.perf_counter()
    try:
        result = preprocess_scan(
            job.source,
            output / job.name,
            mask_path=job.mask_path,
            brain_mask_path=job.brain_mask_path,
            settings=settings,
            overwrite=True,
            output_names=job.output_names,
        )
        job.write_sidecars(result)
    except Exception as error:  # noqa: BLE001 - every failure is reported per scan, the batch goes on
        problem = str(error) if isinstance(error, VolumeError | FileExistsError) else f"{type(error).__name__}: {error}"
        return ScanOutcome(job.name, str(job.source), FAILED, time.perf_counter() - start, error=problem)
    return ScanOutcome(
        job.name,
        str(job.source),
        DONE,
        time.perf_counter() - start,
        mutual_information=result.mutual_information,
        template_dice=result.template_dice,
        result=result,
    )


def _init_worker(threads: int) -> None:
    import SimpleITK as sitk

    # A thread pool would not survive the fork of the next worker; plain threads per filter do.
    sitk.ProcessObject.SetGlobalDefaultThreader("PLATFORM")
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def _log_line(outcome: ScanOutcome, counter: str = "") -> str:
    prefix = f"{counter} {outcome.name}".strip()
    if outcome.status == FAILED:
        return f"{prefix}: FAILED after {outcome.seconds:.1f} s: {outcome.error}"
    if outcome.status == SKIPPED:
        return f"{prefix}: skipped (finished before, inputs and settings unchanged)"
    figures = []
    if outcome.mutual_information is not None:
        figures.append(f"MI {outcome.mutual_information:.3f}")
    if outcome.template_dice is not None:
        figures.append(f"brain Dice vs MNI152 mask {outcome.template_dice:.3f}")
    return f"{prefix}: done in {outcome.seconds:.1f} s" + (f", {', '.join(figures)}" if figures else "")


def preprocess_inputs(
    inputs: Iterable[str | os.PathLike],
    output: str | os.PathLike,
    settings: PreprocessSettings | None = None,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    threads: int | None = None,
    log: Callable[[str], None] | None = None,
) -> BatchReport:
    """Preprocess NIfTI scans and DICOM series into ``output`` (see the module notes).

    Args:
        inputs: NIfTI files, DICOM series folders and folders holding either.
        output: Output folder (created); ``preprocess_manifest.json`` is kept there.
        settings: What to do with each scan (:class:`PreprocessSettings` defaults when ``None``).
        workers: Scans processed at the same time, each in its own process (1: in this process).
        overwrite: Replace existing files that this batch's manifest does not know (by default such
            a scan fails rather than destroying a file it did not write).
        progress: Show a progress bar.
        threads: Threads per scan; the CPU count divided by ``workers`` by default.
        log: Where per-scan lines and the summary go (``tqdm.write`` by default).

    Returns:
        Every outcome; ``report.failed`` is empty when all scans succeeded.

    Raises:
        ValueError: ``workers`` below 1.
        VolumeError: The output folder's manifest is unreadable.
    """
    settings = settings or PreprocessSettings()
    output = Path(output).resolve()
    jobs, failures = find_jobs(inputs, output, dicom_only=settings.dicom_only)
    return preprocess_jobs(jobs, output, settings, workers, overwrite, progress, threads, log, failures)


def preprocess_jobs(
    jobs: list[ScanJob],
    output: str | os.PathLike,
    settings: PreprocessSettings | None = None,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    threads: int | None = None,
    log: Callable[[str], None] | None = None,
    failures: Iterable[ScanOutcome] = (),
) -> BatchReport:
    """Run scan jobs into ``output``: skip finished ones, run the rest, keep the manifest, report.

    Args:
        jobs: The scans, with unique names (output paths relative to ``output``).
        output: Output folder (created); ``preprocess_manifest.json`` is kept there.
        settings: What to do with each scan (:class:`PreprocessSettings` defaults when ``None``).
        workers: See :func:`preprocess_inputs`.
        overwrite: See :func:`preprocess_inputs`.
        progress: See :func:`preprocess_inputs`.
        threads: See :func:`preprocess_inputs`.
        log: See :func:`preprocess_inputs`.
        failures: Inputs that never became jobs, reported first.

    Returns:
        Every outcome; ``report.failed`` is empty when all scans succeeded.

    Raises:
        ValueError: ``workers`` below 1.
        VolumeError: The output folder's manifest is unreadable.
    """
    from tqdm.auto import tqdm

    if workers < 1:
        msg = f"workers must be at least 1, got {workers}"
        raise ValueError(msg)
    settings = settings or PreprocessSettings()
    output = Path(output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    log = log or tqdm.write
    manifest = Manifest(output)
    failures = list(failures)
    report = BatchReport(outcomes=list(failures), manifest_path=manifest.path)
    for outcome in failures:
        log(_log_line(outcome))

    todo: list[tuple[ScanJob, list[dict]]] = []
    settings_record = settings.to_dict()
    for job in jobs:
        try:
            inputs_record = _fingerprint(job)
        except OSError as error:
            report.outcomes.append(ScanOutcome(job.name, str(job.source), FAILED, error=f"{job.source}: {error}"))
            continue
        if manifest.is_current(job.name, inputs_record, settings_record):
            entry = manifest.scans[job.name]
            quality = entry.get("quality", {})
            report.outcomes.append(
                ScanOutcome(
                    job.name,
                    str(job.source),
                    SKIPPED,
                    mutual_information=quality.get("mutual_information"),
                    template_dice=quality.get("template_dice"),
                )
            )
            continue
        planned = list(job.output_paths(output, settings).values())
        strangers = [p for p in planned if p.exists() and p not in manifest.owned(job.name)]
        if strangers and not overwrite:
            problem = f"{strangers[0]}: exists and was not written by this batch (pass overwrite to replace it)"
            report.outcomes.append(ScanOutcome(job.name, str(job.source), FAILED, error=problem))
            continue
        manifest.start(job.name, str(job.source.resolve()), planned)
        todo.append((job, inputs_record))
    manifest.save()

    total = len(report.outcomes) + len(todo)
    bar = tqdm(total=total, unit="scan", desc="preprocess", disable=not progress, file=sys.stderr)
    bar.update(len(report.outcomes))
    for index, outcome in enumerate(report.outcomes, start=1):
        if outcome.status == SKIPPED:
            log(_log_line(outcome, f"[{index}/{total}]"))
    records = dict(todo)
    done_count = len(report.outcomes)

    def collect(job: ScanJob, outcome: ScanOutcome) -> None:
        nonlocal done_count
        if outcome.status == DONE:
            stale = manifest.finish(
                job.name,
                str(job.source.resolve()),
                records[job],
                settings_record,
                outcome.result.outputs(),
                {"mutual_information": outcome.mutual_information, "template_dice": outcome.template_dice},
                outcome.seconds,
            )
            for path in stale:
                path.unlink(missing_ok=True)
        else:
            manifest.fail(job.name, outcome.error or "")
        manifest.save()
        report.outcomes.append(outcome)
        done_count += 1
        bar.update(1)
        log(_log_line(outcome, f"[{done_count}/{total}]"))

    try:
        if workers == 1 or len(todo) <= 1:
            if threads is not None:
                import SimpleITK as sitk

                sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
            for job, _ in todo:
                collect(job, _run_job(job, output, settings))
        else:
            _run_in_workers(todo, output, settings, workers, threads, collect)
    finally:
        bar.close()
    # Table rows in input order, whatever order the workers finished in.
    position = {job.name: index for index, job in enumerate(jobs)}
    report.outcomes.sort(key=lambda outcome: position.get(outcome.name, -1))
    log(report.table())
    return report


def _run_in_workers(
    todo: list[tuple[ScanJob, list[dict]]],
    output: Path,
    settings: PreprocessSettings,
    workers: int,
    threads: int | None,
    collect: Callable[[ScanJob, ScanOutcome], None],
) -> None:
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    # fork where available: a worker then starts in milliseconds instead of re-importing the stack.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker, initargs=(threads,))
    with pool:
        futures: dict[Future, ScanJob] = {pool.submit(_run_job, job, output, settings): job for job, _ in todo}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                job = futures[future]
                try:
                    outcome = future.result()
                except BrokenProcessPool:
                    problem = "its worker process died (out of memory?); rerun to retry"
                    outcome = ScanOutcome(job.name, str(job.source), FAILED, error=problem)
                collect(job, outcome)


def preprocess_folder(
    in_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: PreprocessSettings | None = None,
    **kwargs,  # noqa: ANN003 - forwarded to preprocess_inputs
) -> BatchReport:
    """Preprocess every scan of a folder tree into ``out_dir``, keeping names and sub-folders.

    Args:
        in_dir: Folder of raw scans (NIfTI by the naming rule, and/or folders of DICOM series).
        out_dir: Output folder.
        settings: See :func:`preprocess_inputs`.
        **kwargs: Other options of :func:`preprocess_inputs`.

    Raises:
        VolumeError: ``in_dir`` is not a folder.
    """
    if not Path(in_dir).is_dir():
        raise VolumeError(in_dir, "folder does not exist")
    return preprocess_inputs([in_dir], out_dir, settings=settings, **kwargs)
