"""``simpleslicenet bids BIDS_DIR OUTPUT_DIR participant``: every selected scan's maps, as a derivatives dataset.

* **Resumable.** The output folder's ``simpleslicenet_manifest.json`` (the batch manifest of
  :mod:`simpleslicenet.data.preprocess.manifest`) records per scan the input files (path, size, time),
  the model's and the calibration's SHA-256 and the options. A rerun skips a scan whose record still
  matches with every output intact, and redoes the others.
* **Atomic per subject.** Each subject's folder is rebuilt under a hidden name and swapped in whole
  (:mod:`simpleslicenet.bids.scans`); the manifest, written only by this process, is updated after each subject.
* **A bad scan does not stop the run.** It is reported and listed as failed; the exit status then says so.
* **Workers.** ``workers > 1`` spreads subjects over that many local worker processes
  (``python -m simpleslicenet.bids.worker``, one model load each), handed one subject at a time. A SIGTERM
  or Ctrl-C to this process stops them too (:func:`simpleslicenet.atomic.stops_with_this_process`), and
  each leaves its subject's previous folder as it was.
* **Ray.** With an :class:`~simpleslicenet.executors.ExecutorSettings` of kind ``"ray"`` (the sweep's
  executor settings) each subject is one Ray task (:func:`simpleslicenet.bids.scans.ray_subject`), on a
  local Ray instance or a cluster; a Ray worker process keeps its loaded model for the next subject. The
  dataset, the model and the calibration must be at the same paths on every node. When the output folder is
  not shared (by default when joining a cluster), each subject is written in a scratch folder on its node
  and its files come back here, where its folder is swapped in as a whole (:func:`.scans.store_subject`).
  This process alone keeps the manifest either way. Stopping it cancels the subjects not yet finished.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from simpleslicenet.atomic import stops_with_this_process
from simpleslicenet.bids.derivatives import MANIFEST_NAME, ScanNames, write_dataset_files
from simpleslicenet.bids.scans import (
    ParticipantOptions,
    SubjectJob,
    SubjectResult,
    SubjectRunner,
    ray_subject,
    store_subject,
)
from simpleslicenet.calibration import model_digest
from simpleslicenet.data.bids import BidsError, BidsScan
from simpleslicenet.data.preprocess.manifest import Manifest, file_fingerprint
from simpleslicenet.deploy.masks import MaskRule
from simpleslicenet.executors import ExecutorSettings, ray_results, ray_session, ray_task_options

__all__ = ["PIPELINE_VERSION", "ParticipantReport", "open_manifest", "run_participant"]

# Version of what the participant level writes per scan: a scan finished by another version is redone.
PIPELINE_VERSION = 1


@dataclass
class ParticipantReport:
    """What one participant-level run did.

    Args:
        output: The derivatives folder.
        done: Names of the scans predicted now.
        skipped: Names of the scans finished before (inputs, model, calibration and options unchanged).
        failed: Per failed scan: ``name`` and ``error``.
    """

    output: Path
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """``True`` if no scan failed."""
        return not self.failed

    def summary(self) -> str:
        """One paragraph: counts, and every failed scan with its error."""
        lines = [f"{self.output}: {len(self.done)} scans done, {len(self.skipped)} skipped (finished before), "
                 f"{len(self.failed)} failed"]  # fmt: skip
        lines += [f"  FAILED {failure['name']}: {failure['error']}" for failure in self.failed]
        return "\n".join(lines)


def open_manifest(output: str | os.PathLike) -> Manifest:
    """The participant level's manifest of ``output``."""
    return Manifest(Path(output), name=MANIFEST_NAME, pipeline_version=PIPELINE_VERSION)


def _inputs(scan: BidsScan) -> list[dict[str, Any]]:
    # The lesion mask is outlined in the report: a changed mask redoes the scan.
    paths = (scan.image_path, scan.brain_mask_path, scan.mask_path)
    return [file_fingerprint(path) for path in paths if path is not None]


def _settings(options: ParticipantOptions) -> dict[str, Any]:
    return {
        "model_sha256": model_digest(options.model),
        "calibration_sha256": None if options.calibration is None else model_digest(options.calibration),
        "fdr": options.fdr,
        "threshold": options.threshold,
        "reports": options.reports,
        "precision": options.precision,
    }


def run_participant(
    bids_dir: str | os.PathLike,
    output: str | os.PathLike,
    options: ParticipantOptions,
    participants: str | Sequence[str] | None = None,
    workers: int = 1,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    executor: ExecutorSettings | None = None,
) -> ParticipantReport:
    """Write the anomaly maps, p-value maps, masks, sidecars and reports of the selected scans (see the module notes).

    Args:
        bids_dir: The BIDS dataset.
        output: The derivatives folder (created; a folder another pipeline wrote is refused).
        options: What to do with each scan.
        participants: Which participants: labels (with or without ``sub-``), a ``COLUMN=VALUE[,VALUE]``
            selection on ``participants.tsv``, or ``None`` for all.
        workers: Worker processes (1: in this process). Local executor only.
        progress: Show a progress bar.
        log: Where per-subject lines go (``tqdm.write`` by default).
        executor: Where subjects run: ``None`` or kind ``"local"``: here or in ``workers`` local
            processes; kind ``"ray"``: one Ray task per subject, asking for the settings' resources.

    Returns:
        What was done, skipped and failed.

    Raises:
        ValueError: ``workers`` below 1, ``workers`` with Ray, or options that contradict each other.
        ImportError: Ray is asked for but not installed.
        CalibrationError: An unusable calibration (a ``ValueError``).
        BidsError: The dataset cannot be read, the selection names what is not there, or it holds no scan.
        ModelFileError: The model cannot be used.
        FileExistsError: ``output`` is another pipeline's dataset.
    """
    if workers < 1:
        msg = f"workers must be at least 1, got {workers}"
        raise ValueError(msg)
    on_ray = executor is not None and executor.kind == "ray"
    if on_ray and workers > 1:
        msg = "workers is for the local executor; on Ray each subject is a task asking for the executor's CPUs"
        raise ValueError(msg)
    log = log or tqdm.write
    output = Path(output).resolve()
    MaskRule.from_options(options.model, options.threshold, options.calibration, options.fdr)  # before any scan
    dataset = options.dataset(bids_dir)
    scans = dataset.scans(dataset.select(participants) if participants is not None else None)
    if not scans:
        chosen = "" if participants is None else f" of the participants chosen ({participants})"
        raise BidsError(dataset.root, f"no {options.suffix} scans{chosen}")
    write_dataset_files(output, bids_dir)
    manifest = open_manifest(output)
    settings = _settings(options)
    report = ParticipantReport(output)

    jobs: dict[str, SubjectJob] = {}
    inputs: dict[str, list[dict[str, Any]]] = {}
    sources: dict[str, str] = {}
    for scan in scans:
        try:
            inputs[scan.name] = _inputs(scan)
        except OSError as error:
            report.failed.append({"name": scan.name, "error": f"{scan.image_path}: {error}"})
            continue
        sources[scan.name] = str(scan.source_path.resolve())
        if manifest.is_current(scan.name, inputs[scan.name], settings):
            report.skipped.append(scan.name)
            continue
        planned = [output / path for path in ScanNames(scan).all_files()]
        drop = {path.relative_to(output).as_posix() for path in [*planned, *manifest.owned(scan.name)]}
        job = jobs.setdefault(scan.subject, SubjectJob(scan.subject, []))
        job.scans.append(scan.name)
        job.drop = sorted(set(job.drop) | drop)
        manifest.start(scan.name, sources[scan.name], planned)
    manifest.save()
    if report.skipped:
        log(f"{len(report.skipped)} scans finished before (inputs, model and options unchanged): skipped")

    bar = tqdm(total=sum(len(job.scans) for job in jobs.values()), unit="scan", desc="bids", disable=not progress)

    def collect(result: SubjectResult) -> None:
        for done in result.done:
            manifest.finish(
                done["name"],
                sources[done["name"]],
                inputs[done["name"]],
                settings,
                {kind: output / path for kind, path in done["outputs"].items()},
                {"volume_score": done["volume_score"], "volume_pvalue": done["volume_pvalue"]},
                done["seconds"],
            )
            report.done.append(done["name"])
        for failure in result.failed:
            manifest.fail(failure["name"], failure["error"])
            report.failed.append(failure)
        manifest.save()
        bar.update(len(result.done) + len(result.failed))
        failed = f", {len(result.failed)} failed" if result.failed else ""
        log(f"sub-{result.subject}: {len(result.done)} scans done{failed}")

    try:
        if on_ray:
            if jobs:
                _run_on_ray(list(jobs.values()), bids_dir, output, options, executor, collect)
        elif workers == 1 or len(jobs) <= 1:
            if jobs:
                runner = SubjectRunner(bids_dir, output, options, dataset=dataset)
                for job in jobs.values():
                    collect(runner.run_job(job))
        else:
            _run_in_workers(list(jobs.values()), bids_dir, output, options, workers, collect)
    finally:
        bar.close()
    return report


def _run_on_ray(
    jobs: list[SubjectJob],
    bids_dir: str | os.PathLike,
    output: Path,
    options: ParticipantOptions,
    settings: ExecutorSettings,
    collect: Callable[[SubjectResult], None],
) -> None:
    """One Ray task per job (:func:`.scans.ray_subject`); ``collect`` each result here."""

    def absolute(path: str | None) -> str | None:
        # A Ray worker does not run in this process's folder.
        return None if path is None else str(Path(path).resolve())

    on_nodes = replace(options, model=absolute(options.model), calibration=absolute(options.calibration))
    setup = {"bids_root": str(Path(bids_dir).resolve()), "output": str(output), "options": on_nodes.to_dict()}
    shared = settings.outputs_shared()
    with ray_session(settings) as ray:
        task = ray.remote(ray_subject).options(**ray_task_options(settings))
        setup_ref = ray.put(setup)
        pending = {task.remote(setup_ref, asdict(job), shared): job for job in jobs}
        for job, returned, error in ray_results(pending):
            if error is None and returned["files"] is not None:
                try:
                    store_subject(output, job, returned["files"])
                except (OSError, ValueError) as stored:
                    error = f"its files could not be stored in {output}: {stored}"
            if error is not None:
                collect(SubjectResult(job.subject, failed=[{"name": name, "error": error} for name in job.scans]))
                continue
            collect(SubjectResult(**returned["result"]))


def _run_in_workers(
    jobs: list[SubjectJob],
    bids_dir: str | os.PathLike,
    output: Path,
    options: ParticipantOptions,
    workers: int,
    collect: Callable[[SubjectResult], None],
) -> None:
    """Hand the jobs one at a time to ``workers`` worker processes; ``collect`` each result in this thread."""
    pending: queue.Queue[SubjectJob] = queue.Queue()
    for job in jobs:
        pending.put(job)
    results: queue.Queue[SubjectResult] = queue.Queue()
    setup = {"bids_root": str(Path(bids_dir).resolve()), "output": str(output), "options": options.to_dict()}

    def feed(child: subprocess.Popen) -> None:
        # One thread per worker: send a job, wait for its one-line result, repeat until no job is left.
        job = None
        try:
            while True:
                try:
                    job = pending.get_nowait()
                except queue.Empty:
                    job = None
                    break
                child.stdin.write(json.dumps(asdict(job)) + "\n")
                child.stdin.flush()
                line = child.stdout.readline()
                if not line:
                    break
                results.put(SubjectResult(**json.loads(line)))
                job = None
        except (OSError, ValueError):
            pass  # the worker is gone: its job is reported below
        finally:
            if job is not None:
                problem = f"its worker process ended (exit status {child.poll()}); rerun to retry"
                results.put(SubjectResult(job.subject, failed=[{"name": n, "error": problem} for n in job.scans]))
            try:
                child.stdin.close()
            except OSError:
                pass

    with stops_with_this_process() as children:
        threads = []
        for _ in range(min(workers, len(jobs))):
            child = subprocess.Popen(
                [sys.executable, "-m", "simpleslicenet.bids.worker", json.dumps(setup)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            children.append(child)
            thread = threading.Thread(target=feed, args=(child,), daemon=True, name=f"bids-worker-{child.pid}")
            thread.start()
            threads.append(thread)
        received = 0
        while received < len(jobs):
            try:
                result = results.get(timeout=0.5)
            except queue.Empty:
                if not any(thread.is_alive() for thread in threads) and results.empty():
                    break  # every worker is gone; jobs never handed out are failed below
                continue
            received += 1
            collect(result)
        while not pending.empty():
            job = pending.get_nowait()
            problem = "no worker process left to run it; rerun to retry"
            collect(SubjectResult(job.subject, failed=[{"name": n, "error": problem} for n in job.scans]))
        for child in children:
            child.wait()
