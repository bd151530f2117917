"""NIfTI volume layer: read → crop → back to the scan → write round trips, orientation, resampling, scaling."""

from __future__ import annotations

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from simpleslicenet.data.geometry import (
    VolumeGeometry,
    brain_bounding_box,
    centred_start,
    crop_or_pad,
    from_slices,
    to_slices,
)
from simpleslicenet.data.nifti import read_nifti, write_nifti
from simpleslicenet.data.slices import slice_masks, slice_stack
from simpleslicenet.data.volume import VolumePreprocessing, load_volume, scale_intensity

SHAPE = (40, 48, 30)  # on-disk array shape (i, j, k)
TARGET = (32, 56, 16)  # crops x and z, pads y: both directions of crop_or_pad are exercised

# Voxel-to-world affines of differently oriented files (1 mm, plus one 1×1×2 mm anisotropic).
AFFINES = {
    "RAS": np.diag([1.0, 1.0, 1.0, 1.0]),
    "LPS": np.array([[-1.0, 0, 0, 39], [0, -1.0, 0, 47], [0, 0, 1.0, -5], [0, 0, 0, 1]]),
    # Axes stored as (A, S, L): a permuted, flipped layout with 2 mm slices.
    "ASL": np.array([[0, 0, -1.0, 20], [1.0, 0, 0, -10], [0, 2.0, 0, 3], [0, 0, 0, 1]]),
}


def head(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """An ellipsoid 'brain' with a left-right/front-back asymmetric texture, zero background (int16)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    inside = ((grid / np.array([0.8, 0.85, 0.8])[:, None, None, None]) ** 2).sum(0) < 1
    texture = 400 + 150 * grid[0] + 90 * grid[1] - 60 * grid[2] + rng.integers(0, 60, shape)
    return np.where(inside, texture, 0).astype(np.int16)


@pytest.fixture(scope="session")
def scans(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """One scan per orientation, written once: name -> (path, raw on-disk array, affine)."""
    folder = tmp_path_factory.mktemp("volume_io")
    out = {}
    for name, affine in AFFINES.items():
        data = head(SHAPE, seed=len(out))
        path = folder / f"scan_{name}.nii.gz"
        nib.save(nib.Nifti1Image(data, affine), path)
        out[name] = (path, data, affine)
    return out


@pytest.mark.parametrize("orientation", list(AFFINES))
def test_read_is_canonical_ras(scans: dict, orientation: str) -> None:
    path, data, affine = scans[orientation]
    image, geometry = read_nifti(path)
    assert nib.aff2axcodes(geometry.canonical_affine) == ("R", "A", "S")
    np.testing.assert_array_equal(geometry.affine, affine)
    # The same world point must hold the same value in the file and in the canonical array.
    voxel = np.array([7, 11, 13])
    world = affine[:3, :3] @ voxel + affine[:3, 3]
    canonical = geometry.canonical_affine
    canonical_voxel = np.rint(np.linalg.solve(canonical[:3, :3], world - canonical[:3, 3]))
    assert image[tuple(canonical_voxel.astype(int))] == data[tuple(voxel)]


@pytest.mark.parametrize("orientation", list(AFFINES))
def test_crop_to_scan_write_overlays_input(scans: dict, orientation: str, tmp_path) -> None:  # noqa: ANN001
    path, data, affine = scans[orientation]
    volume = load_volume(path, VolumePreprocessing(target_shape=TARGET, intensity="minmax"))
    assert volume.image.shape == TARGET
    geometry = volume.geometry
    assert geometry.crop_start[1] < 0  # y was padded

    back = geometry.to_scan(to_slices(volume.image), fill=0)
    inside = geometry.to_scan(np.ones(TARGET[::-1], dtype=np.float32), fill=0)
    out = write_nifti(back, geometry, tmp_path / "map.nii.gz")
    written_inside = write_nifti(inside, geometry, tmp_path / "inside.nii.gz", dtype=np.uint8)

    written = nib.load(out)
    assert written.shape == SHAPE
    np.testing.assert_allclose(written.affine, affine)
    values = np.asarray(written.dataobj)
    keep = np.asarray(nib.load(written_inside).dataobj) > 0
    # The box keeps min(target, shape) voxels per canonical axis.
    assert keep.sum() == np.prod(np.minimum(TARGET, geometry.original_shape))
    expected = (data - data.min()) / (data.max() - data.min())
    np.testing.assert_allclose(values[keep], expected[keep], atol=1e-6)
    assert not values[~keep].any()


def test_crop_or_pad_keeps_the_box_and_pads() -> None:
    array = np.random.default_rng(1).random((20, 9, 14)).astype(np.float32)
    start = (3, -4, 5)
    box = crop_or_pad(array, start, (10, 16, 6))
    assert box.shape == (10, 16, 6)
    np.testing.assert_array_equal(box[:, 4:13, :], array[3:13, :, 5:11])
    assert not box[:, :4].any() and not box[:, 13:].any()


def test_crop_start_centres_the_mask() -> None:
    mask = np.zeros((40, 40, 40), dtype=bool)
    mask[10:20, 5:35, 22:30] = True
    assert centred_start(brain_bounding_box(mask), (16, 16, 16)) == (7, 12, 18)
    # An empty mask's box is the whole array: the grid is centred on the array.
    assert centred_start(brain_bounding_box(np.zeros((40, 30, 20), bool)), (16, 16, 16)) == (12, 7, 2)


def test_whole_brain_crop_keeps_every_brain_slice(scans: dict, tmp_path: Path) -> None:
    path, _, _ = scans["RAS"]
    slab = load_volume(path, VolumePreprocessing(target_shape=(40, 48, 12), intensity="minmax"))
    whole = load_volume(path, VolumePreprocessing(target_shape=(40, 48, 12), intensity="minmax", crop="whole_brain"))
    image, _ = read_nifti(path)
    brain_slices = int((image > 0).any(axis=(0, 1)).sum())
    assert slab.image.shape == (40, 48, 12) and whole.image.shape == (40, 48, brain_slices) and brain_slices > 12
    assert whole.brain_mask.sum() == (image > 0).sum() > slab.brain_mask.sum()  # nothing of the brain is cut off
    assert whole.brain_mask[:, :, 0].any() and whole.brain_mask[:, :, -1].any()
    # Back on the scan grid, a map of the whole-brain grid covers every brain voxel of the scan.
    back = whole.geometry.to_scan(whole.image.transpose(2, 1, 0))
    assert back.shape == image.shape and (back[image > 0] > 0).all()


def test_a_grid_that_cuts_the_brain_in_plane_is_reported(scans: dict) -> None:
    path, _, _ = scans["RAS"]
    image, _ = read_nifti(path)
    width = int((image > 0).any(axis=(1, 2)).sum())  # the brain's extent along x
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_volume(path, VolumePreprocessing(target_shape=(40, 48, 12)))  # cut along z only: the slab, by design
        assert not caught
        load_volume(path, VolumePreprocessing(target_shape=(width - 4, 48, 12)))
    (warning,) = caught
    assert str(path) in str(warning.message) and "cuts 4 columns (x) and 0 rows (y)" in str(warning.message)


def test_spacing_round_trip(tmp_path) -> None:  # noqa: ANN001
    # A linear ramp survives linear resampling exactly away from the borders.
    affine = AFFINES["LPS"]
    i, j, k = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in SHAPE], indexing="ij")
    ramp = 100 + 2 * i + 3 * j + 5 * k
    path = tmp_path / "ramp.nii.gz"
    nib.save(nib.Nifti1Image(ramp, affine), path)

    image, geometry = read_nifti(path, spacing_mm=2.0)
    assert np.allclose(np.abs(np.diag(geometry.canonical_affine)[:3]), 2.0)
    assert nib.aff2axcodes(geometry.canonical_affine) == ("R", "A", "S")
    assert all(abs(a - b / 2) <= 1 for a, b in zip(image.shape, SHAPE, strict=True))
    assert geometry.file_shape == SHAPE

    out = write_nifti(image, geometry, tmp_path / "back.nii.gz")
    written = nib.load(out)
    assert written.shape == SHAPE
    np.testing.assert_allclose(written.affine, affine)
    interior = (slice(3, -3),) * 3
    np.testing.assert_allclose(np.asarray(written.dataobj)[interior], ramp[interior], rtol=1e-4)


def test_spacing_through_load_volume(scans: dict) -> None:
    path, _, _ = scans["RAS"]
    volume = load_volume(path, VolumePreprocessing(target_shape=(16, 16, 8), spacing_mm=2.0))
    assert volume.image.shape == (16, 16, 8)
    assert volume.brain_mask.any()


@pytest.mark.parametrize("mode", ["percentile", "minmax"])
def test_intensity_modes_in_unit_range(mode: str) -> None:
    image = head(SHAPE).astype(np.float32) * 3.7 - 250.0  # negative values too
    brain = image > image.min()
    scaled = scale_intensity(image, brain, mode=mode)
    assert scaled.dtype == np.float32
    assert scaled.min() >= 0.0 and scaled.max() <= 1.0
    if mode == "minmax":
        assert scaled.min() == 0.0 and scaled.max() == 1.0
        # Min-max is affine: the order of voxels is kept exactly.
        np.testing.assert_allclose(scaled, (image - image.min()) / (image.max() - image.min()), atol=1e-6)
    else:
        assert not scaled[~brain].any()  # background is zeroed
        high = np.percentile(image[brain], 99.5)
        assert (scaled[image >= high] == 1.0).all()  # above the robust maximum: clipped


def test_unknown_intensity_mode_is_refused() -> None:
    image = head(SHAPE).astype(np.float32)
    with pytest.raises(ValueError, match="zscore"):
        scale_intensity(image, image > 0, mode="zscore")


def test_slice_stack_is_the_axial_slices_in_three_equal_channels() -> None:
    volume = np.random.default_rng(2).random((5, 7, 4)).astype(np.float32)
    stack = slice_stack(volume)
    assert stack.shape == (4, 3, 7, 5) and stack.dtype == torch.float32
    assert stack.stride(1) == 0  # the three channels are one grey copy in memory
    for channel in range(3):
        np.testing.assert_array_equal(stack[:, channel].numpy(), volume.transpose(2, 1, 0))
    mask = slice_masks(volume > 0.5)
    assert mask.dtype == torch.bool
    np.testing.assert_array_equal(mask.numpy(), volume.transpose(2, 1, 0) > 0.5)


def test_to_slices_from_slices_inverse() -> None:
    array = np.random.default_rng(2).random((5, 6, 7))
    slices = to_slices(array)
    assert slices.shape == (7, 6, 5)  # [D, H, W] = (z, y, x)
    assert slices[3, 2, 1] == array[1, 2, 3]
    np.testing.assert_array_equal(from_slices(slices), array)
    assert from_slices(slices).flags["C_CONTIGUOUS"]


def test_to_scan_refuses_an_array_off_the_model_grid() -> None:
    geometry = VolumeGeometry(
        original_shape=(20, 20, 10), affine=np.eye(4), canonical_affine=np.eye(4), crop_start=(2, 2, 1),
        target_shape=(16, 16, 8), path="scan.nii.gz",
    )
    scan = geometry.to_scan(np.full((8, 16, 16), 3.0, np.float32), fill=-1.0)
    assert scan.shape == (20, 20, 10)
    assert scan[2:18, 2:18, 1:9].min() == 3.0 and scan[0, 0, 0] == -1.0
    with pytest.raises(ValueError, match="scan.nii.gz.*not on the model grid"):
        geometry.to_scan(np.ones((8, 32, 32), np.float32))


def test_to_scan_fills_outside_the_box_with_the_lowest_score() -> None:
    geometry = VolumeGeometry(
        original_shape=(6, 6, 4), affine=np.eye(4), canonical_affine=np.eye(4), crop_start=(1, 1, 1),
        target_shape=(4, 4, 2), path="scan.nii.gz",
    )
    model_map = -np.arange(32, dtype=np.float32).reshape(2, 4, 4) - 1  # log-likelihood-like, all negative
    scan = geometry.to_scan(model_map)
    assert scan[0, 0, 0] == model_map.min()
