"""Where ``simpleslicenet predict`` spends its time on the CPU, step by step, for an exported model and a checkpoint.

Prepares, once, in ``--work``:

* 24 scans at 1 mm on the 181×217×181 ICBM grid (lesion phantom subjects cut to that grid), stored as
  int16 ``.nii.gz`` with their brain masks (``NAME_brain.nii.gz``, as ``simpleslicenet preprocess``
  writes them);
* SimpleSliceNet with its defaults (EfficientNet-Lite0, offline ImageNet weights, 8 flow blocks,
  model grid 192×192×96; an untrained flow: timing does not depend on training) as a Lightning
  checkpoint and as an OpenVINO export.

Then, for the export and for the checkpoint:

1. **the whole process**: ``simpleslicenet predict --model M --input scans --output maps`` in a fresh
   interpreter, wall clock, all scans (the figure a user sees);
2. **start-up**: a fresh interpreter that imports the package and loads the model, nothing else;
3. **per step** (seconds per scan): ``predict_paths`` under ``cProfile`` on ``--profile-scans`` scans,
   each step the cumulative time of the package function that does it: reading and reorientation
   (``read_nifti``), the brain-mask file (``read_mask``), intensity scaling, crop/pad, the slice stack,
   the graph (``run_slices``), scoring (``score_volumes``), the map back in the scan's grid
   (``VolumeGeometry.to_scan``), and writing the gzip NIfTI maps (``write_nifti``); where maps are
   written by a background thread, that thread's writing time and the main thread's wait for it are
   reported instead; ``other`` is the rest of the main thread's per-scan time.

The maps of the two model files are compared (largest difference over the maps' largest value).
Timings depend on what else runs on the machine: compare figures of one run, and repeat on a quiet one.

Usage::

    python benchmarks/predict_profile.py                      # 24 scans, writes benchmarks/results/predict_profile.json
    python benchmarks/predict_profile.py --scans 4 --profile-scans 2 --work predict-profile-work   # quick check
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

__all__ = ["main"]

RESULTS = Path(__file__).resolve().parent / "results" / "predict_profile.json"
SCAN_SHAPE = (181, 217, 181)  # the 1 mm ICBM grid (x, y, z)
MODEL_GRID = (192, 192, 96)
# (label, module file suffix, function name, caller function name or None): the steps of one scan.
STEPS = (
    ("read + reorient", "data/nifti.py", "read_nifti", None),
    ("brain mask file", "data/nifti.py", "read_mask", None),
    ("brain mask from intensity", "data/volume.py", "brain_mask_from_intensity", None),
    ("intensity scaling", "data/volume.py", "scale_intensity", None),
    ("crop / pad", "data/geometry.py", "crop_or_pad", "load_volume"),
    ("slice stack", "data/slices.py", "slice_stack", None),
    ("graph", "deploy/inferencer.py", "run_slices", None),
    ("scoring", "models/scoring.py", "score_volumes", None),
    ("map back to scan space", "data/geometry.py", "to_scan", None),
    ("write gzip NIfTI", "data/nifti.py", "write_nifti", None),
)
BATCH = ("deploy/predict.py", "predict_paths")


# ----------------------------------------------------------------------------------- preparation
def prepare_scans(folder: Path, count: int) -> list[Path]:
    """``count`` lesion phantom scans on the 181×217×181 grid with their brain masks (reused when present)."""
    import nibabel as nib

    from simpleslicenet.data.geometry import crop_or_pad
    from simpleslicenet.data.phantom import generate_subject

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"scan_{index:03d}.nii.gz"
        paths.append(path)
        if path.exists() and (folder / f"scan_{index:03d}_brain.nii.gz").exists():
            continue
        subject = generate_subject(index, lesion=True, spacing_mm=1.0)
        start = tuple((n - t) // 2 for n, t in zip(subject.image.shape, SCAN_SHAPE, strict=True))
        affine = subject.affine.copy()
        affine[:3, 3] += affine[:3, :3] @ np.array(start, dtype=float)
        image = crop_or_pad(np.clip(np.rint(subject.image), 0, 32767).astype(np.int16), start, SCAN_SHAPE)
        brain = crop_or_pad(subject.brain_mask.astype(np.uint8), start, SCAN_SHAPE)
        for data, target in ((brain, folder / f"scan_{index:03d}_brain.nii.gz"), (image, path)):
            nifti = nib.Nifti1Image(data, affine)
            nifti.set_qform(affine, code=1)
            nifti.set_sform(affine, code=4)
            nib.save(nifti, target)
    return paths


def prepare_models(folder: Path) -> dict[str, Path]:
    """The default SimpleSliceNet as a checkpoint and as an OpenVINO export (reused when present)."""
    checkpoint, export = folder / "model.ckpt", folder / "export"
    found = sorted(export.rglob("*.xml")) if export.exists() else []
    if checkpoint.exists() and found:
        return {"openvino": found[0], "checkpoint": checkpoint}
    import lightning
    import torch

    from simpleslicenet.data.volume import VolumePreprocessing
    from simpleslicenet.models.simpleslicenet import SimpleSliceNet

    torch.manual_seed(0)
    model = SimpleSliceNet()
    model.preprocessing = VolumePreprocessing(target_shape=MODEL_GRID, modality="t2")
    trainer = lightning.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(checkpoint)
    shutil.rmtree(export, ignore_errors=True)
    xml = model.eval().to_openvino(export)
    return {"openvino": Path(xml), "checkpoint": checkpoint}


# -------------------------------------------------------------------------------------- measuring
def whole_process(model: Path, scans: Path, output: Path) -> float:
    """Wall-clock seconds of ``simpleslicenet predict`` in a fresh interpreter."""
    shutil.rmtree(output, ignore_errors=True)
    command = [sys.executable, "-m", "simpleslicenet.cli", "predict", "--model", str(model), "--input", str(scans), "--output", str(output)]
    start = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, check=False, env=_environment())
    seconds = time.perf_counter() - start
    if completed.returncode != 0:
        msg = f"predict failed ({completed.returncode}): {completed.stderr[-2000:]}"
        raise RuntimeError(msg)
    return seconds


def start_up(model: Path) -> dict[str, float]:
    """Seconds a fresh interpreter needs to import the predict path and to load the model."""
    code = (
        "import time; t0 = time.perf_counter()\n"
        "from simpleslicenet.deploy.predict import predict_paths\n"
        "from simpleslicenet.deploy.inferencer import VolumeInferencer\n"
        "t1 = time.perf_counter()\n"
        f"VolumeInferencer({str(model)!r})\n"
        "t2 = time.perf_counter()\n"
        "print(t1 - t0, t2 - t1)\n"
    )
    start = time.perf_counter()
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=_environment())
    total = time.perf_counter() - start
    imports, load = (float(v) for v in completed.stdout.split()[-2:])
    return {"process_s": total, "imports_s": imports, "model_load_s": load, "interpreter_s": total - imports - load}


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _find(stats: pstats.Stats, suffix: str, name: str) -> list[tuple]:
    return [key for key in stats.stats if key[2] == name and key[0].replace(os.sep, "/").endswith(suffix)]


def _timed_writer(module: object) -> list[float]:
    """Time the background writer of ``predict_paths`` (cProfile sees only the main thread)."""
    seconds: list[float] = []
    write = module.write_scan_outputs

    def timed(*args, **kwargs) -> None:  # noqa: ANN002, ANN003
        start = time.perf_counter()
        try:
            write(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    module.write_scan_outputs = timed
    return seconds


def profile_steps(model: Path, scans: list[Path], work: Path) -> dict:
    """Per-scan seconds of each step of ``predict_paths`` (cumulative times under cProfile)."""
    from simpleslicenet.deploy import predict as predict_module
    from simpleslicenet.deploy.predict import predict_paths

    writer_seconds = _timed_writer(predict_module)

    inputs = work / "profile_inputs"
    shutil.rmtree(inputs, ignore_errors=True)
    inputs.mkdir()
    for scan in scans:
        for source in (scan, scan.with_name(scan.name.replace(".nii.gz", "_brain.nii.gz"))):
            shutil.copy2(source, inputs / source.name)
    output = work / "profile_maps"
    shutil.rmtree(output, ignore_errors=True)
    profiler = cProfile.Profile()
    profiler.enable()
    predict_paths(model, inputs, output, progress=False)
    profiler.disable()
    stats = pstats.Stats(profiler)
    count = len(scans)

    def cumulative(suffix: str, name: str, caller: str | None = None) -> float:
        total = 0.0
        for key in _find(stats, suffix, name):
            _, _, _, cum, callers = stats.stats[key]
            if caller is None:
                total += cum
            else:
                total += sum(values[3] for where, values in callers.items() if where[2] == caller)
        return total

    steps = {label: cumulative(suffix, name, caller) / count for label, suffix, name, caller in STEPS}
    steps["waiting for the writer thread"] = cumulative("concurrent/futures/_base.py", "result", "submit") / count
    # The model is loaded once per batch (reported by start_up), not per scan.
    batch = (cumulative(*BATCH) - cumulative("deploy/inferencer.py", "__init__")) / count
    steps["other"] = max(0.0, batch - sum(steps.values()))
    # Not part of the main thread's time: done while it reads and runs the next scan.
    steps["write gzip NIfTI (writer thread)"] = sum(writer_seconds) / count
    return {"scans": count, "steps_s_per_scan": steps, "predict_paths_s_per_scan": batch, "maps": output}


def map_difference(first: Path, second: Path) -> float:
    """Largest absolute difference of two runs' maps over the first run's largest absolute value."""
    import nibabel as nib

    worst = 0.0
    for path in sorted(first.glob("*_anomaly_map.nii.gz")):
        a = np.asarray(nib.load(path).dataobj, dtype=np.float64)
        b = np.asarray(nib.load(second / path.name).dataobj, dtype=np.float64)
        worst = max(worst, float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12)))
    return worst


def main(argv: list[str] | None = None) -> dict:
    """Prepare, measure, write the JSON and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scans", type=int, default=24)
    parser.add_argument("--profile-scans", type=int, default=6, help="scans profiled step by step per model file")
    parser.add_argument("--work", type=Path, default=None, help="folder for scans, models and maps (kept for reuse)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--label", default="", help="a note stored with the results (e.g. the code version)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.gettempdir()) / "simpleslicenet-predict-profile"
    scans = prepare_scans(work / "scans", args.scans)
    models = prepare_models(work)

    report: dict = {
        "label": args.label,
        "scans": args.scans,
        "scan_shape_xyz": list(SCAN_SHAPE),
        "model_grid_xyz": list(MODEL_GRID),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "models": {},
    }
    maps = {}
    for kind, model in models.items():
        row: dict = {"model": str(model.relative_to(work))}
        row["start_up"] = start_up(model)
        row["whole_process_s"] = whole_process(model, work / "scans", work / f"maps_{kind}")
        row["whole_process_s_per_scan"] = row["whole_process_s"] / args.scans
        profiled = profile_steps(model, scans[: args.profile_scans], work)
        maps[kind] = profiled.pop("maps")
        row.update(profiled)
        report["models"][kind] = row
        print(f"{kind}: {json.dumps(row)}", file=sys.stderr, flush=True)
    report["map_difference_openvino_vs_checkpoint"] = map_difference(work / "maps_checkpoint", work / "maps_openvino")
    report["speed_up_whole_process"] = report["models"]["checkpoint"]["whole_process_s"] / report["models"]["openvino"]["whole_process_s"]
    report["load_average_at_end"] = os.getloadavg()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    from simpleslicenet.atomic import atomic_write_text

    atomic_write_text(args.output, json.dumps(report, indent=2, default=str) + "\n")
    print(markdown(report))
    print(f"\nwritten: {args.output}")
    return report


def markdown(report: dict) -> str:
    """Whole-process figures and the per-step table."""
    models = report["models"]
    lines = [
        (
            f"simpleslicenet predict, {report['scans']} scans {'×'.join(map(str, report['scan_shape_xyz']))} at 1 mm, "
            f"model grid {'×'.join(map(str, report['model_grid_xyz']))}, {report['cpu_count']} CPUs "
            f"(load average {report['load_average_at_start'][0]:.1f} at start)"
        ),
        "",
        "| | " + " | ".join(models) + " |",
        "|---|" + "---|" * len(models),
        "| whole process, s | " + " | ".join(f"{m['whole_process_s']:.1f}" for m in models.values()) + " |",
        "| whole process, s/scan | " + " | ".join(f"{m['whole_process_s_per_scan']:.2f}" for m in models.values()) + " |",
        "| start-up: imports, s | " + " | ".join(f"{m['start_up']['imports_s']:.2f}" for m in models.values()) + " |",
        "| start-up: model load, s | " + " | ".join(f"{m['start_up']['model_load_s']:.2f}" for m in models.values()) + " |",
    ]
    labels = list(next(iter(models.values()))["steps_s_per_scan"])
    for label in labels:
        lines.append(f"| {label}, s/scan | " + " | ".join(f"{m['steps_s_per_scan'][label]:.3f}" for m in models.values()) + " |")
    lines.append(
        f"\nwhole process: the checkpoint takes {report['speed_up_whole_process']:.1f}× as long as the export; "
        f"maps differ by {report['map_difference_openvino_vs_checkpoint']:.1e} of their largest value."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
