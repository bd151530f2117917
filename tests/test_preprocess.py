"""Preprocessing raw scans: N4, registration to MNI152, brain extraction, DICOM input, resumable batches.

The registration and brain-extraction tests use a real head with its skull: Colin27 (``ch2.nii.gz``)
and the same head skull-stripped by BET (``ch2bet.nii.gz``), from the Debian package ``mricron-data``;
they are skipped when it is not installed. Everything runs on coarse grids (3–4 mm) with few
iterations so the whole file stays well under a minute; ``benchmarks/preprocess_quality.py`` measures
the same at 1 mm.
"""

from __future__ import annotations

import copy
import gzip
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from simpleslicenet.data.nifti import VolumeError, read_nifti
from simpleslicenet.data.preprocess import (
    MANIFEST_NAME,
    PreprocessSettings,
    convert_dicom_series,
    preprocess_inputs,
    preprocess_scan,
    read_dicom_series,
)
from simpleslicenet.data.preprocess.bias_field import correct_bias_field
from simpleslicenet.data.preprocess.brain_mask import dice
from simpleslicenet.data.preprocess.evaluation import (
    downsampled_scan,
    mean_surface_distance,
    moved_scan,
    registration_error,
    rigid_motion,
    template_brain_points,
)
from simpleslicenet.data.preprocess.images import affine_of, array_from_image, image_from_array
from simpleslicenet.data.preprocess.template import load_template, template_grid

MRICRON_TEMPLATES = Path("/usr/share/mricron/templates")
CH2, CH2BET = MRICRON_TEMPLATES / "ch2.nii.gz", MRICRON_TEMPLATES / "ch2bet.nii.gz"
needs_colin27 = pytest.mark.skipif(
    not (CH2.is_file() and CH2BET.is_file()),
    reason=f"{CH2} not installed: the Colin27 test head comes from the Debian package mricron-data "
    "(apt-get install mricron-data)",
)

# Colin27 runs: input and output grids of 3 mm, quick registration.
GRID_MM = 3.0
# A 12° turn about an oblique axis and a 13 mm shift, about the head's centre.
MOTION_AXIS, MOTION_DEG, MOTION_SHIFT = (1.0, 0.4, 0.3), 12.0, (9.0, -7.0, 6.0)


def pydicom_test_file(*parts: str) -> Path:
    """A file or folder of pydicom's bundled test data."""
    import pydicom

    return Path(pydicom.__file__).parent / "data" / "test_files" / Path(*parts)


# --- Colin27: registration and brain extraction ------------------------------------------------


def _centre(img: nib.Nifti1Image) -> np.ndarray:
    return img.affine[:3, :3] @ ((np.asarray(img.shape[:3]) - 1) / 2) + img.affine[:3, 3]


def _native_dice(result, reference: nib.Nifti1Image) -> tuple[float, float]:  # noqa: ANN001
    """Dice against a BET mask in the scan's own space: of the output brain mask and of the bare template mask."""
    bet = np.asarray(reference.dataobj) > 0.5
    brain = nib.load(result.brain_mask_path)
    # scan voxel -> scan world -> template world (inverse registration) -> output voxel
    pull = np.linalg.inv(brain.affine) @ np.linalg.inv(result.template_to_scan) @ reference.affine
    refined = ndimage.affine_transform(np.asarray(brain.dataobj, np.float32), pull, output_shape=bet.shape, order=1)
    prior = array_from_image(load_template(GRID_MM).brain_mask).astype(np.float32)
    carried = ndimage.affine_transform(prior, pull, output_shape=bet.shape, order=1)
    return dice(refined > 0.5, bet), dice(carried > 0.5, bet)


@pytest.fixture(scope="module")
def colin27(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Colin27 with its skull at 3 mm, unmoved and moved by a known rigid motion, both preprocessed."""
    if not (CH2.is_file() and CH2BET.is_file()):
        pytest.skip(f"{CH2} not installed (apt-get install mricron-data)")
    folder = tmp_path_factory.mktemp("colin27")
    head, bet = nib.load(CH2), nib.load(CH2BET)
    bet_mask = nib.Nifti1Image((np.asarray(bet.dataobj) > 0).astype(np.float32), bet.affine)
    motion = rigid_motion(MOTION_AXIS, MOTION_DEG, MOTION_SHIFT, _centre(head))
    scans = {
        "unmoved": (downsampled_scan(head, GRID_MM), downsampled_scan(bet_mask, GRID_MM, order=0)),
        "moved": (moved_scan(head, motion, GRID_MM), moved_scan(bet_mask, motion, GRID_MM, order=0)),
    }
    settings = PreprocessSettings.quick(GRID_MM)
    out = {"motion": motion}
    for name, (scan, reference) in scans.items():
        nib.save(scan, folder / f"{name}.nii.gz")
        result = preprocess_scan(folder / f"{name}.nii.gz", folder / "out" / f"{name}.nii.gz", settings=settings)
        out[name] = (result, reference)
    return out


@needs_colin27
def test_colin27_moved_by_a_known_rigid_motion_comes_back_onto_the_template(colin27: dict) -> None:
    (moved, _), (unmoved, _) = colin27["moved"], colin27["unmoved"]
    points = template_brain_points(2.0)
    # The motion itself displaces brain points by well over a centimetre on average ...
    shifted = np.c_[points, np.ones(len(points))] @ colin27["motion"].T
    assert np.linalg.norm(shifted[:, :3] - points, axis=1).mean() > 12.0
    # ... and the registration undoes it: template points land where the unmoved head's registration
    # put them, moved along (mean distance over all template brain voxels).
    error = registration_error(moved.template_to_scan, unmoved.template_to_scan, colin27["motion"], points)
    assert error["mean_mm"] < 2.0 and error["max_mm"] < 3.0, error
    # The same seen on the outputs: the two brain masks on the template grid lie on each other
    # (symmetric mean distance between their surfaces).
    masks = [np.asarray(nib.load(r.brain_mask_path).dataobj) > 0 for r in (moved, unmoved)]
    assert mean_surface_distance(*masks, spacing_mm=GRID_MM) < 2.0 and dice(*masks) > 0.97
    assert moved.transform_path.name == "moved_template_to_scan.tfm" and moved.transform_path.is_file()
    # Registration-quality figures are reported and sensible for a good registration.
    assert moved.mutual_information > 0.3 and moved.template_dice > 0.9


@needs_colin27
@pytest.mark.parametrize("name", ["unmoved", "moved"])
def test_colin27_brain_extraction_matches_bet_better_than_the_template_mask(colin27: dict, name: str) -> None:
    result, reference = colin27[name]
    refined, template_only = _native_dice(result, reference)
    assert refined >= 0.95, (refined, template_only)
    assert refined > template_only + 0.005  # the refinement, not the template's mask, reaches it
    image = np.asarray(nib.load(result.image_path).dataobj)
    brain = np.asarray(nib.load(result.brain_mask_path).dataobj) > 0
    assert image.shape == brain.shape == tuple(load_template(GRID_MM).image.GetSize())
    assert not image[~brain].any() and (image[brain] > 0).mean() > 0.99  # skull-stripped, nothing lost inside


@needs_colin27
def test_n4_removes_a_known_bias_field() -> None:
    head = downsampled_scan(nib.load(CH2), 4.0)
    brain = np.asarray(downsampled_scan(nib.load(CH2BET), 4.0).dataobj) > 0
    data = np.asarray(head.dataobj, dtype=np.float32)
    x, y, z = (np.indices(data.shape).reshape(3, -1).T @ head.affine[:3, :3].T + head.affine[:3, 3]).T
    applied = (0.3 * x / 70 + 0.2 * z / 70 - 0.15 * (y / 80) ** 2).reshape(data.shape)
    result = correct_bias_field(image_from_array(data * np.exp(applied), head.affine), shrink_to_mm=12.0)
    estimated = array_from_image(result.log_field)
    # The field is found up to a constant factor ...
    a, b = applied[brain] - applied[brain].mean(), estimated[brain] - estimated[brain].mean()
    assert np.corrcoef(a, b)[0, 1] > 0.9
    # ... and white matter (bright, homogeneous) is as uniform again as before the field was applied.
    white = brain & (data > 90)

    def spread(values: np.ndarray) -> float:
        return float(np.std(np.log(values[white])))

    assert spread(data * np.exp(applied)) > 2 * spread(data)
    assert spread(array_from_image(result.image)) < 1.2 * spread(data)


# --- skull-stripped input, no registration -----------------------------------------------------


def test_preprocess_aligns_a_moved_scaled_skull_stripped_brain_to_mni(tmp_path: Path) -> None:
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template

    template = np.asarray(load_mni152_template(resolution=1).dataobj, dtype=np.float32)
    brain = np.asarray(load_mni152_brain_mask(resolution=1).dataobj) > 0
    # The template brain at 2 mm, stored LPS, shifted and 10% larger in world space.
    moved = (template * brain)[::-2, ::-2, ::2]
    moved = (moved * 1000 / moved.max()).astype(np.int16)
    affine = np.diag([-2.2, -2.2, 2.2, 1.0])
    affine[:3, 3] = [110.0, 120.0, -60.0]
    lesion = np.zeros(moved.shape, dtype=np.uint8)
    lesion[45:55, 55:65, 45:50] = 1
    nib.save(nib.Nifti1Image(moved, affine), tmp_path / "raw.nii.gz")
    nib.save(nib.Nifti1Image(lesion, affine), tmp_path / "raw_mask.nii.gz")

    out = tmp_path / "mni" / "case.nii.gz"
    settings = PreprocessSettings.quick(3.0, skull_stripped=True)
    result = preprocess_scan(tmp_path / "raw.nii.gz", out, mask_path=tmp_path / "raw_mask.nii.gz", settings=settings)
    written = nib.load(result.image_path)
    grid = load_template(3.0)
    assert written.shape == tuple(grid.image.GetSize())
    template_mask = array_from_image(grid.brain_mask) > 0
    aligned = np.asarray(written.dataobj) > 0
    assert dice(aligned, template_mask) > 0.95
    assert result.brain_mask_path == tmp_path / "mni" / "case_brain.nii.gz" and result.brain_mask_path.exists()
    written_brain = np.asarray(nib.load(result.brain_mask_path).dataobj) > 0
    assert abs(result.template_dice - dice(written_brain, template_mask)) < 1e-9
    # The lesion follows the scan: 10×10×5 voxels of 2.2 mm, shrunk back by 1.1 per axis, ≈ 4000 mm³.
    carried = np.asarray(nib.load(result.mask_path).dataobj)
    assert result.mask_path.name == "case_mask.nii.gz"
    assert abs(int(carried.sum()) * 27 - 4000) < 0.2 * 4000
    assert carried[~aligned].sum() == 0  # inside the brain
    assert nib.load(result.image_path).header["sform_code"] == 4  # labelled as MNI152 space

    before = out.read_bytes()
    with pytest.raises(FileExistsError, match="case"):
        preprocess_scan(tmp_path / "raw.nii.gz", out, settings=settings)
    assert out.read_bytes() == before


def test_the_1mm_output_grid_is_the_template_grid() -> None:
    from nilearn.datasets import load_mni152_template

    template = load_mni152_template(resolution=1)
    grid = template_grid(1.0)
    assert tuple(grid.GetSize()) == template.shape
    np.testing.assert_allclose(affine_of(grid), template.affine, atol=1e-6)
    coarse = template_grid(3.0)
    # Same field of view: the outer faces of the voxels coincide (within a voxel of rounding).
    np.testing.assert_allclose(np.asarray(coarse.GetSize()) * 3.0, np.asarray(template.shape), atol=3.0)


def test_preprocess_without_registration_reorients_and_resamples(tmp_path: Path) -> None:
    shape = (40, 48, 30)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    inside = ((grid / np.array([0.8, 0.85, 0.8])[:, None, None, None]) ** 2).sum(0) < 1
    data = np.where(inside, 400 + 150 * grid[0] + 90 * grid[1], 0).astype(np.int16)
    affine = np.array([[-1.0, 0, 0, 39], [0, -1.0, 0, 47], [0, 0, 1.0, -5], [0, 0, 0, 1]])  # LPS on disk
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "lps.nii.gz")

    settings = PreprocessSettings(register=False, bias_correction=False, spacing_mm=2.0)
    result = preprocess_scan(tmp_path / "lps.nii.gz", tmp_path / "ras.nii.gz", settings=settings)
    written = nib.load(result.image_path)
    assert nib.aff2axcodes(written.affine) == ("R", "A", "S")
    np.testing.assert_allclose(np.abs(np.diag(written.affine)[:3]), 2.0)
    assert all(abs(a - b / 2) <= 1 for a, b in zip(written.shape, shape, strict=True))
    assert result.transform_path is None and result.template_dice is None
    original, geometry = read_nifti(tmp_path / "lps.nii.gz")

    def centre(values: np.ndarray, to_world: np.ndarray) -> np.ndarray:
        return to_world[:3, :3] @ np.argwhere(values > 0).mean(0) + to_world[:3, 3]

    # Same world position: the object's centre of mass stays put (within a voxel).
    np.testing.assert_allclose(
        centre(np.asarray(written.dataobj), written.affine), centre(original, geometry.canonical_affine), atol=2.0
    )


def test_a_scan_that_cannot_be_registered_is_refused_with_its_name(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).uniform(1, 100, (20, 20, 20)).astype(np.float32)
    nib.save(nib.Nifti1Image(noise, np.diag([4.0, 4, 4, 1])), tmp_path / "noise.nii.gz")
    with pytest.raises(VolumeError, match="noise.nii.gz.*(registration|brain)"):
        preprocess_scan(tmp_path / "noise.nii.gz", tmp_path / "out.nii.gz", settings=PreprocessSettings.quick(4.0))
    assert not (tmp_path / "out.nii.gz").exists()


# --- DICOM -------------------------------------------------------------------------------------


def _rotation(z_deg: float, x_deg: float) -> np.ndarray:
    z, x = np.deg2rad(z_deg), np.deg2rad(x_deg)
    about_z = np.array([[np.cos(z), -np.sin(z), 0], [np.sin(z), np.cos(z), 0], [0, 0, 1]])
    about_x = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
    return about_z @ about_x


def write_mr_series(
    folder: Path,
    n_slices: int = 6,
    pixel_spacing: tuple[float, float] = (0.5, 0.3125),
    gap_mm: float = 2.0,
    series_uid: str | None = None,
    skip: tuple[int, ...] = (),
    prefix: str = "IM",
) -> list[dict]:
    """An oblique MR series built from pydicom's real ``MR_small.dcm`` slice, files in shuffled order.

    Rows and columns have different spacings, so a swapped PixelSpacing shows; every slice has its
    own intensities, so a wrong slice order shows. Returns each slice's geometry and pixels.
    """
    import pydicom
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    source = pydicom.dcmread(pydicom_test_file("MR_small.dcm"))
    rotation = _rotation(20.0, 10.0)
    row_dir, col_dir = rotation[:, 0], rotation[:, 1]
    normal = np.cross(row_dir, col_dir)
    first = np.array([-80.0, -90.0, 10.0])
    series_uid = series_uid or generate_uid()
    order = np.random.default_rng(1).permutation(n_slices)
    slices = []
    for k in range(n_slices):
        if k in skip:
            continue
        ds = copy.deepcopy(source)
        pixels = (source.pixel_array.astype(np.int16) // 4 + 300 * k).astype(np.int16)
        ds.PixelData = pixels.tobytes()
        position = first + k * gap_mm * normal
        ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [f"{v}" for v in pixel_spacing]
        ds.SliceThickness = f"{gap_mm}"
        ds.InstanceNumber = int(order[k]) + 1
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(folder / f"{prefix}{order[k]:04d}", enforce_file_format=True)
        slices.append({"position": position, "row_dir": row_dir, "col_dir": col_dir, "pixels": pixels})
    return slices


def _assert_geometry_kept(nifti: nib.Nifti1Image, slices: list[dict], pixel_spacing: tuple[float, float]) -> None:
    """The NIfTI affine maps voxel (column c, row r, slice k) where DICOM puts that pixel, in RAS."""
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    data = np.asarray(nifti.dataobj)
    starts = [nifti.affine[:3, :3] @ [0, 0, k] + nifti.affine[:3, 3] for k in range(data.shape[2])]
    assert data.shape[2] == len(slices)
    for item in slices:
        ras_position = lps_to_ras @ item["position"]
        k = int(np.argmin([np.linalg.norm(s - ras_position) for s in starts]))
        np.testing.assert_allclose(starts[k], ras_position, atol=1e-3)
        for r, c in [(0, 0), (5, 0), (0, 7), (11, 13)]:
            # DICOM: PixelSpacing = (between rows, between columns); the row direction is that of columns.
            lps = item["position"] + c * pixel_spacing[1] * item["row_dir"] + r * pixel_spacing[0] * item["col_dir"]
            np.testing.assert_allclose(nifti.affine @ [c, r, k, 1], [*(lps_to_ras @ lps), 1], atol=1e-3)
        if "pixels" in item:
            np.testing.assert_array_equal(data[:, :, k].T, item["pixels"])


def test_dicom_series_to_nifti_keeps_the_geometry_of_an_oblique_series(tmp_path: Path) -> None:
    spacing = (0.5, 0.3125)
    slices = write_mr_series(tmp_path / "series", pixel_spacing=spacing)
    out = convert_dicom_series(tmp_path / "series", tmp_path / "series.nii.gz")
    _assert_geometry_kept(nib.load(out), slices, spacing)
    np.testing.assert_allclose(nib.load(out).header.get_zooms(), (0.3125, 0.5, 2.0), atol=1e-4)


def test_dicom_series_of_the_pydicom_dicomdir_keeps_its_geometry(tmp_path: Path) -> None:
    import pydicom

    folder = pydicom_test_file("dicomdirtests", "98892001", "CT5N")
    if not folder.is_dir():
        pytest.skip(f"{folder} not shipped by this pydicom")
    slices = []
    for path in sorted(folder.iterdir()):
        header = pydicom.dcmread(path)
        orientation = np.asarray(header.ImageOrientationPatient, dtype=float)
        slices.append(
            {
                "position": np.asarray(header.ImagePositionPatient, dtype=float),
                "row_dir": orientation[:3],
                "col_dir": orientation[3:],
                "pixels": header.pixel_array * float(header.get("RescaleSlope", 1))
                + float(header.get("RescaleIntercept", 0)),
            }
        )
    spacing = tuple(float(v) for v in pydicom.dcmread(next(folder.iterdir())).PixelSpacing)
    out = convert_dicom_series(folder, tmp_path / "ct.nii.gz")
    _assert_geometry_kept(nib.load(out), slices, spacing)


def test_dicom_folders_that_are_not_one_clean_series_are_refused(tmp_path: Path) -> None:
    write_mr_series(tmp_path / "two", series_uid="1.2.3.4.1")
    write_mr_series(tmp_path / "two", n_slices=3, series_uid="1.2.3.4.2", pixel_spacing=(1.0, 1.0), prefix="B")
    with pytest.raises(VolumeError, match="two: holds 2 DICOM series"):
        read_dicom_series(tmp_path / "two")
    write_mr_series(tmp_path / "gap", skip=(3,))
    with pytest.raises(VolumeError, match="gap: DICOM slices are not evenly spaced"):
        read_dicom_series(tmp_path / "gap")


# --- batches: folders, resume, failures ----------------------------------------------------------


def small_brain(path: Path, shift_mm: tuple[float, float, float] = (0, 0, 0), scale: float = 1.0) -> Path:
    """The MNI152 brain (skull-stripped) at 4 mm, shifted: a scan that registers in about a second."""
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template

    template = load_mni152_template(resolution=1)
    brain = np.asarray(load_mni152_brain_mask(resolution=1).dataobj) > 0
    data = (np.asarray(template.dataobj) * brain)[::4, ::4, ::4]
    affine = template.affine @ np.diag([4.0, 4.0, 4.0, 1.0])
    affine[:3, 3] += shift_mm
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image((data * 1000 * scale).astype(np.int16), affine), path)
    return path


BATCH_SETTINGS = PreprocessSettings.quick(4.0, skull_stripped=True)


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*.nii.gz")}


def test_batch_keeps_the_layout_resumes_and_redoes_what_changed(tmp_path: Path) -> None:
    raw, out = tmp_path / "raw", tmp_path / "out"
    small_brain(raw / "train" / "good" / "a.nii.gz", (5.0, -3.0, 2.0))
    lesion_scan = small_brain(raw / "test" / "lesion" / "b.nii.gz", (-4.0, 2.0, 0.0))
    lesion = np.zeros(nib.load(lesion_scan).shape, np.uint8)
    lesion[20:24, 25:29, 20:23] = 1
    nib.save(nib.Nifti1Image(lesion, nib.load(lesion_scan).affine), raw / "test" / "lesion" / "b_mask.nii.gz")
    lines: list[str] = []

    first = preprocess_inputs([raw], out, settings=BATCH_SETTINGS, progress=False, log=lines.append)
    assert [o.status for o in first.outcomes] == ["done", "done"]
    names = {"train/good/a.nii.gz", "train/good/a_brain.nii.gz", "test/lesion/b.nii.gz", "test/lesion/b_brain.nii.gz",
             "test/lesion/b_mask.nii.gz"}
    assert set(_mtimes(out)) == names  # the NiftiFolder layout, masks by the naming rule
    assert any("train/good/a.nii.gz: done" in line and "MI " in line and "Dice vs MNI152" in line for line in lines)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    entry = manifest["scans"]["test/lesion/b.nii.gz"]
    assert entry["complete"] and entry["settings"] == BATCH_SETTINGS.to_dict() and entry["pipeline_version"] >= 1
    assert {Path(item["path"]).name for item in entry["inputs"]} == {"b.nii.gz", "b_mask.nii.gz"}
    assert set(entry["outputs"]) == {"image", "brain_mask", "lesion_mask", "transform"}
    assert 0.9 < entry["quality"]["template_dice"] <= 1.0

    before = _mtimes(out)
    second = preprocess_inputs([raw], out, settings=BATCH_SETTINGS, progress=False, log=lines.append)
    assert [o.status for o in second.outcomes] == ["skipped", "skipped"]
    assert _mtimes(out) == before  # nothing rewritten

    # A changed input is redone, the other one is not; so is a scan that lost its lesion mask
    # (and its stale lesion-mask output goes).
    small_brain(raw / "train" / "good" / "a.nii.gz", (6.0, -3.0, 2.0), scale=0.9)
    (raw / "test" / "lesion" / "b_mask.nii.gz").unlink()
    third = preprocess_inputs([raw], out, settings=BATCH_SETTINGS, progress=False, log=lines.append)
    assert {o.name: o.status for o in third.outcomes} == {"train/good/a.nii.gz": "done", "test/lesion/b.nii.gz": "done"}
    assert not (out / "test" / "lesion" / "b_mask.nii.gz").exists()

    # An output deleted by hand is noticed (the manifest alone does not make a scan finished).
    (out / "train" / "good" / "a_brain.nii.gz").unlink()
    fourth = preprocess_inputs([raw], out, settings=BATCH_SETTINGS, progress=False, log=lines.append)
    statuses = {o.name: o.status for o in fourth.outcomes}
    assert statuses == {"train/good/a.nii.gz": "done", "test/lesion/b.nii.gz": "skipped"}

    # Different settings redo everything.
    changed = PreprocessSettings.quick(4.0, skull_stripped=True, seed=3)
    fifth = preprocess_inputs([raw], out, settings=changed, progress=False, log=lines.append)
    assert [o.status for o in fifth.outcomes] == ["done", "done"]


def test_brats_layout_pairs_each_modality_with_its_segmentation_and_reads_back(tmp_path: Path) -> None:
    from simpleslicenet.data.datamodules.brats import list_brats

    raw, out = tmp_path / "BraTS2021", tmp_path / "BraTS2021-mni"
    subject = raw / "BraTS2021_00001"
    for modality in ("t2", "flair"):
        scan = small_brain(subject / f"BraTS2021_00001_{modality}.nii.gz", (3.0, -2.0, 1.0))
    seg = np.zeros(nib.load(scan).shape, np.uint8)
    seg[20:24, 25:29, 20:23] = 2  # BraTS labels 1, 2, 4: any non-zero is lesion
    nib.save(nib.Nifti1Image(seg, nib.load(scan).affine), subject / "BraTS2021_00001_seg.nii.gz")
    report = preprocess_inputs([raw], out, settings=BATCH_SETTINGS, progress=False)
    # The segmentation is no scan of its own: it is carried (nearest neighbour) beside each modality.
    assert sorted(o.name for o in report.outcomes) == ["BraTS2021_00001/BraTS2021_00001_flair.nii.gz",
                                                       "BraTS2021_00001/BraTS2021_00001_t2.nii.gz"]  # fmt: skip
    assert all(o.status == "done" for o in report.outcomes)
    written = nib.load(out / "BraTS2021_00001" / "BraTS2021_00001_t2_mask.nii.gz").get_fdata()
    assert set(np.unique(written)) <= {0.0, 1.0, 2.0} and written.any()
    # The BraTS datamodule reads the preprocessed layout: the registered scan, its mask and brain mask.
    (row,) = list_brats(out, "t2").itertuples()
    assert row.image_path.endswith("BraTS2021_00001_t2.nii.gz") and row.mask_path.endswith("_t2_mask.nii.gz")
    assert row.brain_mask_path.endswith("_t2_brain.nii.gz")


def test_batch_does_not_replace_files_it_did_not_write(tmp_path: Path) -> None:
    raw, out = tmp_path / "raw", tmp_path / "out"
    small_brain(raw / "a.nii.gz")
    out.mkdir()
    (out / "a.nii.gz").write_bytes(b"someone else's file")
    report = preprocess_inputs([raw / "a.nii.gz"], out, settings=BATCH_SETTINGS, progress=False, log=lambda _: None)
    assert report.failed and "a.nii.gz: exists and was not written by this batch" in report.failed[0].error
    assert (out / "a.nii.gz").read_bytes() == b"someone else's file"
    report = preprocess_inputs([raw / "a.nii.gz"], out, settings=BATCH_SETTINGS, overwrite=True, progress=False,
                               log=lambda _: None)
    assert not report.failed and nib.load(out / "a.nii.gz").shape == tuple(load_template(4.0).image.GetSize())


def test_cli_batch_reports_a_broken_scan_finishes_the_others_and_exits_non_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from simpleslicenet.cli import main

    raw, out = tmp_path / "raw", tmp_path / "out"
    small_brain(raw / "a.nii.gz", (3.0, 0.0, 0.0))
    small_brain(raw / "c.nii.gz", (0.0, 4.0, -2.0))
    whole = gzip.compress(nib.Nifti1Image(np.ones((30, 30, 30), np.float32), np.eye(4)).to_bytes())
    (raw / "b.nii.gz").write_bytes(whole[: len(whole) // 2])  # truncated download
    write_mr_series(raw / "dicom" / "mr")  # a DICOM series: converted only in --dicom-only mode

    inputs = [str(raw / name) for name in ("a.nii.gz", "b.nii.gz", "c.nii.gz", "missing.nii.gz")]
    argv = ["preprocess", *inputs, "--output", str(out), "--quick", "--spacing", "4", "--skull-stripped",
            "--workers", "2", "--no-progress"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 1
    printed = capsys.readouterr().out
    assert "b.nii.gz: FAILED" in printed and "truncated or corrupt" in printed
    assert "missing.nii.gz: no such file or folder" in printed
    summary = printed[printed.index("scan "):]  # the table at the end
    assert "2 done, 0 skipped, 2 failed" in summary
    for name, status in [("a.nii.gz", "done"), ("b.nii.gz", "failed"), ("c.nii.gz", "done")]:
        assert any(line.split()[:2] == [name, status] for line in summary.splitlines()), (name, summary)
    assert (out / "a.nii.gz").is_file() and (out / "c_brain.nii.gz").is_file() and not (out / "b.nii.gz").exists()

    # The DICOM-only path converts every series folder below an input folder, keeping its place.
    main(["preprocess", str(raw / "dicom"), "--output", str(tmp_path / "converted"), "--dicom-only", "--no-progress"])
    converted = nib.load(tmp_path / "converted" / "mr.nii.gz")
    assert converted.shape == (64, 64, 6)
    assert "1 done, 0 skipped, 0 failed" in capsys.readouterr().out


def test_a_folder_with_no_scans_and_an_output_inside_the_input_are_handled(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    report = preprocess_inputs([tmp_path / "empty"], tmp_path / "out", settings=BATCH_SETTINGS, progress=False,
                               log=lambda _: None)
    assert "empty: holds no NIfTI scans and no DICOM series" in report.failed[0].error
    # Outputs written inside the input folder are never picked up as inputs on the next run.
    small_brain(tmp_path / "data" / "a.nii.gz")
    for _ in range(2):
        report = preprocess_inputs([tmp_path / "data"], tmp_path / "data" / "mni", settings=BATCH_SETTINGS,
                                   progress=False, log=lambda _: None)
        assert [o.name for o in report.outcomes] == ["a.nii.gz"]
    assert os.path.isfile(tmp_path / "data" / "mni" / "a_brain.nii.gz")
