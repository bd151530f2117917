"""Quality and speed of ``simpleslicenet preprocess`` at 1 mm on a real head with its skull (Colin27).

Colin27 (``ch2.nii.gz``, 1 mm, with skull) and the same head skull-stripped by BET (``ch2bet.nii.gz``)
come from the Debian package ``mricron-data`` (``apt-get install mricron-data``). The head is
preprocessed with the default settings (N4, rigid + affine Mattes-MI registration to MNI152 2009,
the template's 1 mm grid, template brain mask refined with the scan's intensities) as it is, and
after known rigid motions (10–15° about oblique axes, 9–20 mm shifts; resampled onto a plain 1 mm
grid as a scanner would store it). Per scan:

* **seconds**: wall time of :func:`~simpleslicenet.data.preprocess.preprocess_scan` (read to write);
* **registration error**: mean (and largest) distance over all template brain voxels between where
  the moved head's registration puts them and where the unmoved head's registration puts them, moved
  by the known motion (:func:`~simpleslicenet.data.preprocess.evaluation.registration_error`);
  **surface distance**: symmetric mean distance between the two runs' brain-mask surfaces on the
  template grid. For ``ch2bet --skull-stripped`` the registration error compares the skull-stripped
  head's registration with the head-with-skull's (no motion): how much the skull moves the result; its
  surface distance also holds the difference between the two ways of making the brain mask
  (intensities there, refined template mask here);
* **brain Dice**: the output brain mask, carried back onto the scan's grid through the registration,
  against BET's brain (non-zero voxels of ``ch2bet`` moved the same way); beside it the Dice of the
  template's brain mask carried back unrefined;
* the registration-quality figures the batch logs: final mutual information with the template and the
  brain mask's Dice with the template's.

Usage::

    python benchmarks/preprocess_quality.py                 # 1 mm, the default settings
    python benchmarks/preprocess_quality.py --spacing 3 --quick   # the test suite's coarse version

Prints a markdown table and writes ``benchmarks/results/preprocess_quality.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from simpleslicenet.atomic import atomic_write_text
from simpleslicenet.data.preprocess import PreprocessSettings, preprocess_scan
from simpleslicenet.data.preprocess.brain_mask import dice
from simpleslicenet.data.preprocess.evaluation import (
    mean_surface_distance,
    moved_scan,
    registration_error,
    rigid_motion,
    template_brain_points,
)
from simpleslicenet.data.preprocess.images import array_from_image
from simpleslicenet.data.preprocess.template import load_template

__all__ = ["main"]

TEMPLATES = Path("/usr/share/mricron/templates")
# (rotation axis, degrees, translation mm): turns of 10–15° about oblique axes, shifts of 9–20 mm.
MOTIONS = {
    "ch2 moved A": ((1.0, 0.4, 0.3), 12.0, (9.0, -7.0, 6.0)),
    "ch2 moved B": ((0.0, 0.3, 1.0), -15.0, (-12.0, 15.0, 5.0)),
    "ch2 moved C": ((0.5, 1.0, -0.4), 10.0, (4.0, 8.0, -20.0)),
}


def _centre(img: nib.Nifti1Image) -> np.ndarray:
    return img.affine[:3, :3] @ ((np.asarray(img.shape[:3]) - 1) / 2) + img.affine[:3, 3]


def _dice_on_scan_grid(result, reference: nib.Nifti1Image, spacing_mm: float) -> tuple[float, float]:  # noqa: ANN001
    """Dice against BET's brain on the scan's grid: of the output mask, and of the unrefined template mask."""
    bet = np.asarray(reference.dataobj) > 0.5
    brain = nib.load(result.brain_mask_path)
    pull = np.linalg.inv(brain.affine) @ np.linalg.inv(result.template_to_scan) @ reference.affine
    refined = ndimage.affine_transform(np.asarray(brain.dataobj, np.float32), pull, output_shape=bet.shape, order=1)
    prior = array_from_image(load_template(spacing_mm).brain_mask).astype(np.float32)
    carried = ndimage.affine_transform(prior, pull, output_shape=bet.shape, order=1)
    return dice(refined > 0.5, bet), dice(carried > 0.5, bet)


def _brain(result) -> np.ndarray:  # noqa: ANN001
    return np.asarray(nib.load(result.brain_mask_path).dataobj) > 0


def main(argv: list[str] | None = None) -> dict:
    """Run the measurements, print the table, write the JSON; returns the record."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spacing", type=float, default=1.0, help="output voxel size in mm")
    parser.add_argument("--quick", action="store_true", help="PreprocessSettings.quick instead of the defaults")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "preprocess_quality.json")
    args = parser.parse_args(argv)
    head_path, bet_path = TEMPLATES / "ch2.nii.gz", TEMPLATES / "ch2bet.nii.gz"
    if not (head_path.is_file() and bet_path.is_file()):
        sys.exit(f"{head_path} not found: install the Debian package mricron-data (apt-get install mricron-data)")
    settings = PreprocessSettings.quick(args.spacing) if args.quick else PreprocessSettings(spacing_mm=args.spacing)
    head, bet = nib.load(head_path), nib.load(bet_path)
    bet_mask = nib.Nifti1Image((np.asarray(bet.dataobj) > 0).astype(np.float32), bet.affine)
    points = template_brain_points(2.0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cases = {"ch2 (unmoved)": (head_path, bet_mask, np.eye(4), settings)}
        for name, (axis, degrees, shift) in MOTIONS.items():
            motion = rigid_motion(axis, degrees, shift, _centre(head))
            path = folder / f"{name.replace(' ', '_')}.nii.gz"
            nib.save(moved_scan(head, motion, 1.0), path)
            cases[name] = (path, moved_scan(bet_mask, motion, 1.0, order=0), motion, settings)
        skull_stripped = PreprocessSettings(**{**settings.to_dict(), "skull_stripped": True})
        cases["ch2bet --skull-stripped"] = (bet_path, bet_mask, np.eye(4), skull_stripped)

        results = {}
        for name, (path, reference, motion, case_settings) in cases.items():
            start = time.perf_counter()
            result = preprocess_scan(path, folder / "out" / f"{len(results)}.nii.gz", settings=case_settings)
            seconds = time.perf_counter() - start
            results[name] = result
            row = {
                "scan": name,
                "seconds": round(seconds, 1),
                "steps_s": result.seconds,
                "mutual_information": round(result.mutual_information, 3),
                "template_dice": round(result.template_dice, 4),
            }
            if name != "ch2 (unmoved)":
                unmoved = results["ch2 (unmoved)"]
                error = registration_error(result.template_to_scan, unmoved.template_to_scan, motion, points)
                row["registration_error_mm"] = {k: round(v, 2) for k, v in error.items()}
                row["surface_distance_mm"] = round(
                    mean_surface_distance(_brain(result), _brain(unmoved), settings.spacing_mm), 2
                )
            if not case_settings.skull_stripped:
                refined, template_only = _dice_on_scan_grid(result, reference, settings.spacing_mm)
                row["brain_dice_vs_bet"] = round(refined, 4)
                row["template_mask_dice_vs_bet"] = round(template_only, 4)
            rows.append(row)
            print(f"{name}: {seconds:.1f} s", flush=True)

    def cell(row: dict, key: str, sub: str | None = None) -> str:
        value = row.get(key)
        if value is None:
            return "—"
        return str(value[sub]) if sub else str(value)

    print()
    print(
        "| scan | s/scan | registration error mm (mean / max) | surface distance mm | brain Dice vs BET "
        "| template mask alone | MI | Dice vs MNI mask |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        error = "—" if "registration_error_mm" not in row else (
            f"{row['registration_error_mm']['mean_mm']} / {row['registration_error_mm']['max_mm']}"
        )
        print(
            f"| {row['scan']} | {row['seconds']} | {error} | {cell(row, 'surface_distance_mm')} | "
            f"{cell(row, 'brain_dice_vs_bet')} | {cell(row, 'template_mask_dice_vs_bet')} | "
            f"{row['mutual_information']} | {row['template_dice']} |"
        )
    import SimpleITK as sitk

    record = {
        "settings": settings.to_dict(),
        "rows": rows,
        "simpleitk": sitk.Version_VersionString(),
        "cpu_count": os.cpu_count(),
        "itk_threads": sitk.ProcessObject.GetGlobalDefaultNumberOfThreads(),
        "load_average_at_end": list(os.getloadavg()),
        "platform": platform.platform(),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.output, json.dumps(record, indent=2) + "\n")
    print(f"\nwritten: {args.output}")
    return record


if __name__ == "__main__":
    main()
