"""A model remembers the voxel size it was trained at and brings every new scan to it.

The tiny phantom is generated at 4 mm. The same test scan saved at 4 mm and resampled to 2 mm (as a
user's finer scan of the same head) must give the same anomaly map, through the Python inferencer and
through ``predict``; without the spacing in the preprocessing record the two maps disagree.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.processing import resample_from_to, resample_to_output


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.fixture(scope="module")
def two_spacings(phantom_datamodule, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:  # noqa: ANN001
    """A lesion test scan at its own 4 mm and resampled to 2 mm, each with its brain mask beside it."""
    row = phantom_datamodule.test_data.samples.query("label_index == 1").iloc[0]
    folders = {}
    for spacing in (4.0, 2.0):
        folder = tmp_path_factory.mktemp(f"scan_{spacing:g}mm")
        for source, name, order in ((row.image_path, "scan", 1), (row.brain_mask_path, "scan_brain", 0)):
            image = nib.load(source)
            if spacing != 4.0:
                image = resample_to_output(image, voxel_sizes=(spacing,) * 3, order=order)
            nib.save(nib.Nifti1Image(np.asarray(image.dataobj, dtype=np.float32), image.affine), folder / f"{name}.nii.gz")
        folders[f"{spacing:g}mm"] = folder
    return folders


def test_inferencer_brings_a_finer_scan_to_the_training_spacing(trained_simpleslicenet, two_spacings) -> None:  # noqa: ANN001
    from simpleslicenet.deploy import VolumeInferencer

    _, _, checkpoint = trained_simpleslicenet
    inferencer = VolumeInferencer(checkpoint, device="cpu")
    assert inferencer.preprocessing.spacing_mm == 4.0
    coarse, fine = (
        inferencer.predict(two_spacings[key] / "scan.nii.gz", two_spacings[key] / "scan_brain.nii.gz")
        for key in ("4mm", "2mm")
    )
    assert fine.geometry.file_shape is not None and coarse.geometry.file_shape is None  # only the 2 mm scan was resampled
    # Same model input up to interpolation error, so the same map on the model grid.
    assert _correlation(coarse.model_map, fine.model_map) > 0.95

    # Without the recorded spacing the 2 mm scan is cut to a box half the size: a different map.
    inferencer.preprocessing = replace(inferencer.preprocessing, spacing_mm=None)
    unaware = inferencer.predict(two_spacings["2mm"] / "scan.nii.gz", two_spacings["2mm"] / "scan_brain.nii.gz")
    assert _correlation(coarse.model_map, unaware.model_map) < 0.8


def test_predict_writes_matching_maps_on_each_scans_own_grid(trained_simpleslicenet, two_spacings, tmp_path: Path) -> None:  # noqa: ANN001
    from simpleslicenet.deploy import predict_paths

    _, _, checkpoint = trained_simpleslicenet
    maps = {}
    for key, folder in two_spacings.items():
        predict_paths(checkpoint, folder, tmp_path / key, progress=False)
        written = nib.load(tmp_path / key / "scan_anomaly_map.nii.gz")
        assert written.shape == nib.load(folder / "scan.nii.gz").shape
        maps[key] = written
    on_coarse_grid = resample_from_to(maps["2mm"], maps["4mm"], order=1)
    brain = np.asarray(nib.load(two_spacings["4mm"] / "scan_brain.nii.gz").dataobj) > 0
    assert _correlation(np.asarray(on_coarse_grid.dataobj)[brain], np.asarray(maps["4mm"].dataobj)[brain]) > 0.9
