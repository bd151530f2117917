"""The brain phantom generator, its on-disk dataset and the BrainPhantom datamodule."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from simpleslicenet.data.phantom import (
    CONTRASTS,
    MANIFEST_NAME,
    PhantomOptions,
    generate_phantom_dataset,
    generate_subject,
    load_tissue_template,
    read_manifest,
    subject_files,
)
from simpleslicenet.data.phantom.lesions import MASS_EFFECT_REACH

SPACING = 4.0


def _read(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


def _files(root: Path, entry: dict, contrast: str = "t2") -> dict[str, np.ndarray]:
    return {key: _read(path) for key, path in subject_files(root, entry["index"], contrast).items()}


# --- generator ---------------------------------------------------------------------------------------


def test_same_seed_gives_identical_subject() -> None:
    first = generate_subject(7, lesion=True, seed=3, spacing_mm=SPACING)
    second = generate_subject(7, lesion=True, seed=3, spacing_mm=SPACING)
    np.testing.assert_array_equal(first.image, second.image)
    np.testing.assert_array_equal(first.seg, second.seg)
    np.testing.assert_array_equal(first.brain_mask, second.brain_mask)
    assert first.lesions == second.lesions


def test_other_seed_or_index_gives_other_subject() -> None:
    base = generate_subject(7, lesion=True, seed=3, spacing_mm=SPACING)
    for other in (
        generate_subject(7, lesion=True, seed=4, spacing_mm=SPACING),
        generate_subject(8, lesion=True, seed=3, spacing_mm=SPACING),
    ):
        assert not np.array_equal(base.brain_mask, other.brain_mask)
        assert not np.array_equal(base.seg, other.seg)
        assert not np.array_equal(base.image, other.image)


def test_lesion_subject_is_its_healthy_twin_outside_the_lesions() -> None:
    """Subject i with lesions equals subject i without them beyond the lesions' mass-effect reach,
    and differs from it clearly inside the lesion mask (what healthy tissue would have been)."""
    sick = generate_subject(2, lesion=True, seed=0, spacing_mm=SPACING)
    healthy = generate_subject(2, lesion=False, seed=0, spacing_mm=SPACING)
    np.testing.assert_array_equal(sick.brain_mask, healthy.brain_mask)
    assert healthy.seg.sum() == 0 and healthy.lesions == []

    reach = np.zeros(sick.seg.shape, dtype=bool)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in sick.seg.shape], indexing="ij"), axis=-1)
    for lesion in sick.lesions:
        distance_mm = np.linalg.norm(grid - np.array(lesion["centre_voxel"]), axis=-1) * SPACING
        reach |= distance_mm <= MASS_EFFECT_REACH * lesion["radius_mm"] + 2 * SPACING
    np.testing.assert_array_equal(sick.image[~reach], healthy.image[~reach])

    lesion = sick.seg.astype(bool)
    change = np.abs(sick.image[lesion] - healthy.image[lesion]).mean()
    assert change > 3 * sick.noise_std
    # The mass effect moves tissue beyond the lesion and its one-voxel partial-volume rim.
    rim = ndimage.binary_dilation(lesion, structure=np.ones((3, 3, 3), dtype=bool))
    moved = (sick.image != healthy.image) & ~rim
    assert moved.sum() > 0.1 * lesion.sum()


def test_brain_box_shortcut_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Warping only the voxels near the brain gives bit-identical subjects to warping every voxel
    that could reach the template (2 mm: the warp is interpolated from a 4 mm lattice)."""
    from simpleslicenet.data.phantom import generator

    fast = generate_subject(3, lesion=True, spacing_mm=2.0)
    monkeypatch.setattr(generator._SubjectWarp, "brain_box", lambda self, step: self.output_box())
    slow = generate_subject(3, lesion=True, spacing_mm=2.0)
    np.testing.assert_array_equal(fast.image, slow.image)
    np.testing.assert_array_equal(fast.brain_mask, slow.brain_mask)
    np.testing.assert_array_equal(fast.seg, slow.seg)


def test_unknown_contrast_is_rejected(tmp_path: Path) -> None:
    assert CONTRASTS == ("t1", "t1ce", "t2", "flair")
    with pytest.raises(ValueError, match="allowed contrasts are t1, t1ce, t2, flair"):
        generate_subject(0, contrast="dwi", spacing_mm=SPACING)
    with pytest.raises(ValueError, match="unknown contrast 'PD'"):
        generate_phantom_dataset(tmp_path / "x", n_healthy=1, n_lesion=0, contrast="PD", progress=False)
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="spacing_mm"):
        generate_subject(0, spacing_mm=0.1)


def _tissue_means(contrast: str) -> dict[str, float]:
    """Mean image intensity over nearly pure tissue, on a subject aligned with the template."""
    still = PhantomOptions(rotation_deg=0.0, scale=0.0, translation_mm=0.0, deformation_mm=0.0)
    subject = generate_subject(0, contrast=contrast, spacing_mm=2.0, options=still)
    template = load_tissue_template(2.0)
    box = tuple(slice(o, o + n) for o, n in zip(template.offset, template.brain.shape, strict=True))
    image = subject.image[box]
    means = {}
    for name in ("wm", "gm", "csf"):
        pure = (getattr(template, name) > 0.8) & (template.brain > 0)
        assert pure.sum() > 200, name
        means[name] = float(image[pure].mean())
    return means


@pytest.mark.parametrize(
    ("contrast", "order"),
    [("t1", ("wm", "gm", "csf")), ("t1ce", ("wm", "gm", "csf")), ("t2", ("csf", "gm", "wm")), ("flair", ("gm", "wm", "csf"))],
)
def test_tissue_contrast_order(contrast: str, order: tuple[str, str, str]) -> None:
    means = _tissue_means(contrast)
    brightest, middle, darkest = (means[k] for k in order)
    assert brightest > middle > darkest, means


def test_generation_is_background_free_outside_the_brain() -> None:
    subject = generate_subject(1, lesion=True, contrast="flair", spacing_mm=SPACING)
    assert subject.image.dtype == np.float32
    assert (subject.image[subject.brain_mask == 0] == 0).all()
    assert (subject.image[subject.brain_mask == 1] > 0).mean() > 0.99
    assert set(np.unique(subject.seg)) == {0, 1}


# --- dataset on disk -----------------------------------------------------------------------------------


def test_dataset_layout_and_manifest(phantom_root: Path) -> None:
    manifest = read_manifest(phantom_root)
    assert manifest is not None
    params = manifest["parameters"]
    assert (params["seed"], params["contrast"], params["spacing_mm"]) == (0, "t2", 4.0)
    assert (params["n_healthy"], params["n_lesion"]) == (6, 4)
    assert "options" in params and manifest["package_version"]
    labels = [entry["label"] for entry in manifest["subjects"]]
    assert labels == ["healthy"] * 6 + ["lesion"] * 4
    template = load_tissue_template(SPACING)
    for entry in manifest["subjects"]:
        paths = subject_files(phantom_root, entry["index"], "t2")
        assert paths["image"].name == f"{entry['id']}_t2.nii.gz"
        image = nib.load(str(paths["image"]))
        assert image.shape == template.shape
        assert image.get_data_dtype() == np.int16
        assert nib.load(str(paths["seg"])).get_data_dtype() == np.uint8
        np.testing.assert_allclose(image.affine, template.affine)
        assert np.allclose(np.abs(np.diag(image.affine)[:3]), SPACING)


def test_files_match_in_memory_generation(phantom_root: Path) -> None:
    """A subject on disk is the subject generate_subject makes: counts and order play no part."""
    manifest = read_manifest(phantom_root)
    for entry in (manifest["subjects"][5], manifest["subjects"][8]):
        subject = generate_subject(entry["index"], lesion=entry["label"] == "lesion", seed=0, spacing_mm=SPACING)
        files = _files(phantom_root, entry)
        np.testing.assert_array_equal(files["image"], np.rint(subject.image).astype(np.int16))
        np.testing.assert_array_equal(files["seg"], subject.seg)
        np.testing.assert_array_equal(files["brainmask"], subject.brain_mask)
        assert entry["lesions"] == subject.lesions


def test_masks_are_consistent(phantom_root: Path) -> None:
    manifest = read_manifest(phantom_root)
    lo, hi = PhantomOptions().lesions.radius_mm
    half_diagonal_mm = SPACING * np.sqrt(3) / 2
    for entry in manifest["subjects"]:
        files = _files(phantom_root, entry)
        seg, brain = files["seg"] > 0, files["brainmask"] > 0
        assert not (seg & ~brain).any(), "lesion voxels outside the brain"
        if entry["label"] == "healthy":
            assert not seg.any() and entry["lesions"] == []
            continue
        assert 1 <= len(entry["lesions"]) <= 3
        assert seg.sum() == entry["lesion_voxels"] > 0
        # Every lesion voxel lies within the radius of some lesion, and every radius is in range.
        covered = np.zeros(seg.shape, dtype=bool)
        grid = np.stack(np.meshgrid(*[np.arange(n) for n in seg.shape], indexing="ij"), axis=-1)
        for lesion in entry["lesions"]:
            assert lo <= lesion["radius_mm"] <= hi
            assert 0 < lesion["core_radius_mm"] < lesion["radius_mm"]
            assert lesion["voxels"] > 0
            distance = np.linalg.norm(grid - np.array(lesion["centre_voxel"]), axis=-1) * SPACING
            covered |= distance <= lesion["radius_mm"] + half_diagonal_mm
            # Placed fully inside the brain: the lesion's whole ball stays off the background.
            ball = distance <= lesion["radius_mm"]
            assert brain[ball].all()
        assert covered[seg].all()


def test_lesions_stand_out_from_their_surroundings(phantom_root: Path) -> None:
    manifest = read_manifest(phantom_root)
    for entry in manifest["subjects"]:
        if entry["label"] != "lesion":
            continue
        files = _files(phantom_root, entry)
        seg, brain, image = files["seg"] > 0, files["brainmask"] > 0, files["image"].astype(np.float64)
        shell = ndimage.binary_dilation(seg, iterations=2) & ~seg & brain
        difference = abs(image[seg].mean() - image[shell].mean())
        assert difference > 3 * entry["noise_std"], (entry["id"], difference)


@pytest.mark.parametrize("seed", [0, 1])
def test_lesion_families_have_their_size_place_and_contrast(seed: int) -> None:
    for index in (30, 31):
        stats = {}
        for family in ("tumour", "small", "multifocal", "hypointense"):
            subject = generate_subject(index, True, "t2", seed, 2.0, family=family)
            seg, brain = subject.seg > 0, subject.brain_mask > 0
            ring = ndimage.binary_dilation(seg, iterations=2) & ~seg & brain
            stats[family] = (len(subject.lesions), seg.sum() * 8 / 1000, subject.image[seg].mean() / subject.image[ring].mean())
            assert subject.family == family
            assert sum(entry["voxels"] for entry in subject.lesions) >= seg.sum()  # foci may touch
            assert all(entry["volume_ml"] == pytest.approx(entry["voxels"] * 8 / 1000) for entry in subject.lesions)
            if family == "multifocal":  # foci sit in white matter: the healthy twin shows white matter there
                twin = generate_subject(index, False, "t2", seed, 2.0)
                tissue = subject.intensities
                in_white = []
                for entry in subject.lesions:
                    assert entry["radius_mm"] <= 5.0
                    value = twin.image[tuple(int(round(v)) for v in entry["centre_voxel"])]
                    in_white.append(abs(value - tissue["wm"]) < abs(value - tissue["gm"]))
                assert np.mean(in_white) >= 0.75, in_white  # bias field and noise blur a few
        count, volume_ml, _ = stats["small"]
        assert count == 1 and 0.3 < volume_ml < 4.5
        count, volume_ml, _ = stats["multifocal"]
        assert 4 <= count <= 10 and volume_ml < 3.0
        assert stats["hypointense"][2] < 0.8  # darker than the tissue around it, even in T2
        assert stats["multifocal"][2] > 1.2 and stats["tumour"][2] > 1.1  # T2: bright
        assert stats["tumour"][1] > stats["small"][1]


def test_families_take_turns_and_are_recorded(tmp_path: Path) -> None:
    from simpleslicenet.data.datamodules.phantom import BrainPhantom

    families = ["small", "multifocal", "hypointense"]
    datamodule = BrainPhantom(
        root=tmp_path, n_healthy=2, n_lesion=4, spacing_mm=4.0, target_shape=(32, 32, 16), lesion_families=families, progress=False
    )
    datamodule.prepare_data()
    manifest = read_manifest(tmp_path)
    assert manifest["parameters"]["lesion_families"] == families
    assert [entry["family"] for entry in manifest["subjects"]] == [None, None, "small", "multifocal", "hypointense", "small"]
    samples = datamodule.make_samples()
    assert list(samples["lesion_family"]) == ["none", "none", "small", "multifocal", "hypointense", "small"]
    lesion = samples[samples["label_index"] == 1]
    assert (lesion["lesion_volume_ml"] > 0).all() and (samples[samples["label_index"] == 0]["lesion_volume_ml"] == 0).all()
    with pytest.raises(ValueError, match="unknown lesion families .*'cyst'.* choose from tumour, small, multifocal, hypointense"):
        BrainPhantom(lesion_families=["cyst"])
    # A tumour-only phantom keeps the parameters (and so the cached folders) it always had.
    root = generate_phantom_dataset(tmp_path / "tumours", n_healthy=1, n_lesion=1, spacing_mm=4.0, progress=False)
    assert "lesion_families" not in read_manifest(root)["parameters"]


def test_matching_manifest_is_reused(phantom_root: Path) -> None:
    paths = [phantom_root / MANIFEST_NAME, *sorted(phantom_root.glob("Phantom_*/*.nii.gz"))]
    before = {p: p.stat().st_mtime_ns for p in paths}
    generate_phantom_dataset(phantom_root, n_healthy=6, n_lesion=4, contrast="t2", seed=0, spacing_mm=4.0, progress=False)
    assert {p: p.stat().st_mtime_ns for p in paths} == before
    assert not list(phantom_root.glob("**/.*.tmp")) and not list(phantom_root.glob("**/.*.nii.gz"))


def test_changed_parameters_regenerate_in_place(tmp_path: Path) -> None:
    root = generate_phantom_dataset(tmp_path, n_healthy=2, n_lesion=1, contrast="t2", spacing_mm=4.0, progress=False)
    assert sorted(p.name for p in root.glob("Phantom_*")) == ["Phantom_00000", "Phantom_00001", "Phantom_00002"]
    stranger = tmp_path / "notes.txt"
    stranger.write_text("not the generator's")
    old_mtime = (root / MANIFEST_NAME).stat().st_mtime_ns

    generate_phantom_dataset(tmp_path, n_healthy=1, n_lesion=1, contrast="t1", spacing_mm=4.0, progress=False)
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    assert manifest["parameters"]["contrast"] == "t1"
    assert (root / MANIFEST_NAME).stat().st_mtime_ns != old_mtime
    assert sorted(p.name for p in root.glob("Phantom_*")) == ["Phantom_00000", "Phantom_00001"]
    assert not list(root.glob("Phantom_*/*_t2.nii.gz")), "files of the old contrast remain"
    assert [entry["label"] for entry in manifest["subjects"]] == ["healthy", "lesion"]
    assert stranger.read_text() == "not the generator's"

    # A missing file makes the folder incomplete: it is written again.
    missing = subject_files(root, 1, "t1")["seg"]
    missing.unlink()
    generate_phantom_dataset(tmp_path, n_healthy=1, n_lesion=1, contrast="t1", spacing_mm=4.0, progress=False)
    assert missing.exists()


# --- datamodule --------------------------------------------------------------------------------------


def test_datamodule_splits(phantom_datamodule) -> None:  # noqa: ANN001
    table = phantom_datamodule.volume_table
    assert len(table) == 10
    train = table[table["split"] == "train"]
    val = table[table["split"] == "val"]
    test = table[table["split"] == "test"]
    assert len(train) == 4 and (train["label_index"] == 0).all()
    assert (val["label_index"] == 1).any() and (test["label_index"] == 1).any()
    assert (test["label_index"] == 0).any(), "normal test volumes"
    ids = [set(part["volume_id"]) for part in (train, val, test)]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert set().union(*ids) == set(table["volume_id"])
    assert len(phantom_datamodule.train_data) == 4
    assert phantom_datamodule.category == "phantom_t2"


def test_datamodule_batches_carry_lesions(phantom_datamodule) -> None:  # noqa: ANN001
    batch = next(iter(phantom_datamodule.train_dataloader()))
    assert tuple(batch.image.shape) == (16, 3, 32, 32)
    assert not batch.gt_mask.any()
    lesion_volumes = 0
    for batch in phantom_datamodule.test_dataloader():
        if batch.volume_label[0] == 1:
            lesion_volumes += 1
            assert batch.gt_mask.any()
            assert not (batch.gt_mask & ~batch.brain_mask).any()
    table = phantom_datamodule.volume_table
    assert lesion_volumes == int(((table["split"] == "test") & (table["label_index"] == 1)).sum()) > 0


def test_datamodule_default_root_and_bad_arguments(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from simpleslicenet.data.datamodules.phantom import BrainPhantom

    monkeypatch.setenv("SIMPLESLICENET_CACHE", str(tmp_path))
    datamodule = BrainPhantom(modality="FLAIR", n_healthy=12, n_lesion=8, seed=5)
    assert datamodule.root.parent == tmp_path / "phantom"
    assert datamodule.root.name == "flair_2mm_seed5_12h8l"
    assert not datamodule.root.exists(), "nothing is generated before prepare_data()"
    with pytest.raises(ValueError, match="allowed contrasts"):
        BrainPhantom(modality="swi")
    with pytest.raises(ValueError, match="at least 2 healthy"):
        BrainPhantom(n_healthy=1)



def test_a_test_site_tests_on_another_generator_and_validates_on_the_training_site(phantom_root: Path, tmp_path: Path) -> None:
    from conftest import PHANTOM_KWARGS

    from simpleslicenet.data.datamodules.phantom import BrainPhantom

    root = tmp_path / "site_a"
    root.symlink_to(phantom_root, target_is_directory=True)  # the training site is the session's phantom
    site = {"deformation_mm": 6.0, "bias_strength": 0.35, "noise": [0.03, 0.05]}
    datamodule = BrainPhantom(root=root, target_shape=(32, 32, 16), progress=False, test_site=site, **PHANTOM_KWARGS)
    datamodule.setup()
    table = datamodule.volume_table
    one_site = BrainPhantom(root=root, target_shape=(32, 32, 16), progress=False, **PHANTOM_KWARGS)
    one_site.setup()
    plain = one_site.volume_table.set_index("volume_id")["split"]
    # Training is the one-site phantom's; every other volume of the training site validates.
    here = table[~table["volume_id"].str.startswith("site-")].set_index("volume_id")["split"]
    assert (here[plain == "train"] == "train").all() and (here[plain != "train"] == "val").all()
    tested = table[table["split"] == "test"]
    assert len(tested) == PHANTOM_KWARGS["n_healthy"] + PHANTOM_KWARGS["n_lesion"]
    assert tested["volume_id"].str.startswith("site-").all() and set(tested["label_index"]) == {0, 1}
    manifest = json.loads((datamodule.test_site_root / "manifest.json").read_text())
    assert manifest["parameters"]["seed"] == PHANTOM_KWARGS["seed"] + 1
    assert manifest["parameters"]["options"]["noise"] == [0.03, 0.05]
    assert manifest["parameters"]["options"]["deformation_mm"] == 6.0
    with pytest.raises(ValueError, match=r"unknown generator settings \['noise_level'\]"):
        BrainPhantom(root=root, test_site={"noise_level": 0.1})
