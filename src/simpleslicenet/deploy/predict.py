"""``simpleslicenet predict``: anomaly maps for one scan or a folder of scans, never overwriting by accident."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from simpleslicenet.data.volume import NIFTI_SUFFIXES, VolumeError, write_nifti
from simpleslicenet.deploy.inferencer import VolumeInferencer
from simpleslicenet.visualization import scan_stem

__all__ = ["find_scans", "output_paths", "predict_paths"]


def find_scans(inputs: str | os.PathLike) -> list[Path]:
    """The scan itself, or every NIfTI file in a folder (sorted); a clear error if there is none."""
    inputs = Path(inputs)
    if inputs.is_file():
        return [inputs]
    if inputs.is_dir():
        scans = sorted(p for p in inputs.iterdir() if p.is_file() and p.name.endswith(NIFTI_SUFFIXES))
        if not scans:
            raise VolumeError(inputs, "folder holds no NIfTI scans (.nii or .nii.gz)")
        return scans
    raise VolumeError(inputs, "no such file or folder")


def output_paths(scan: Path, output: Path, threshold: float | None) -> dict[str, Path]:
    """Where the outputs for ``scan`` go."""
    stem = scan_stem(scan)
    paths = {"map": output / f"{stem}_anomaly_map.nii.gz"}
    if threshold is not None:
        paths["mask"] = output / f"{stem}_anomaly_mask.nii.gz"
    return paths


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def predict_paths(
    model: str | os.PathLike,
    inputs: str | os.PathLike,
    output: str | os.PathLike,
    threshold: float | str | None = None,
    overwrite: bool = False,
    precision: str = "f32",
    device: str = "CPU",
    progress: bool = True,
) -> list[dict]:
    """Write an anomaly map (and optionally a mask) per scan, plus ``scores.json`` and ``scores.csv``.

    Maps are in each scan's own grid and affine, so they overlay the scan in any viewer. Scores are in
    the model's own units (higher is more anomalous).

    Args:
        model: Exported ``.xml`` or ``.ckpt``.
        inputs: A scan or a folder of scans.
        output: Output folder (created).
        threshold: Also write ``<scan>_anomaly_mask.nii.gz`` of voxels whose score exceeds it; ``"val"``
            uses the threshold that maximised Dice on the validation split during training.
        overwrite: Replace existing outputs; otherwise refuse before writing anything.
        precision: OpenVINO precision, ``"f32"`` or ``"bf16"``.
        device: OpenVINO device or torch device.
        progress: Show a progress bar.

    Returns:
        One record per scan: paths written, volume score and slice scores.
    """
    scans = find_scans(inputs)
    output = Path(output)
    planned = [output_paths(scan, output, threshold) for scan in scans]
    names = [paths["map"].name for paths in planned]
    clashes = sorted({name for name in names if names.count(name) > 1})
    if clashes:
        msg = f"{inputs}: several scans would write {clashes[0]} (same name, e.g. .nii and .nii.gz); rename them"
        raise ValueError(msg)
    summaries = [output / "scores.json", output / "scores.csv"]
    if not overwrite:
        existing = [p for paths in planned for p in paths.values() if p.exists()] + [p for p in summaries if p.exists()]
        if existing:
            msg = f"{existing[0]}: already exists ({len(existing)} output files in all); pass --overwrite to replace them"
            raise FileExistsError(msg)
    inferencer = VolumeInferencer(model, device=device, precision=precision)
    if threshold == "val":
        threshold = inferencer.metadata.get("dice_threshold")
        if threshold is None:
            msg = f"{model}: holds no validation threshold (trained without a validation split); pass a number"
            raise ValueError(msg)
    threshold = None if threshold is None else float(threshold)
    output.mkdir(parents=True, exist_ok=True)
    records = []
    for scan, paths in tqdm(list(zip(scans, planned, strict=True)), desc="predict", unit="scan", disable=not progress):
        prediction = inferencer.predict(scan)
        write_nifti(prediction.anomaly_map, prediction.geometry, paths["map"], overwrite=True)
        if threshold is not None:
            mask = ((prediction.anomaly_map > threshold) & prediction.scan_brain_mask).astype(np.uint8)
            write_nifti(mask, prediction.geometry, paths["mask"], dtype=np.uint8, overwrite=True)
        records.append(
            {
                "scan": str(scan),
                "volume_score": prediction.volume_score,
                "slice_scores": [float(s) for s in prediction.slice_scores],
                **{f"{key}_path": str(path) for key, path in paths.items()},
            }
        )
    _atomic_write(summaries[0], json.dumps({"model": str(model), "threshold": threshold, "scans": records}, indent=2))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["scan", "volume_score", "max_slice_score", "map_path"])
    for record in records:
        writer.writerow([record["scan"], record["volume_score"], max(record["slice_scores"]), record["map_path"]])
    _atomic_write(summaries[1], buffer.getvalue())
    return records
