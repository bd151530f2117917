"""``simpleslicenet preprocess`` on a BIDS dataset writes a BIDS derivatives dataset that the reader reads back,
and ``calibrate`` / ``predict`` take a BIDS dataset's participants by a selection spec.

The dataset is a tiny phantom in BIDS layout (6 subjects at 4 mm, one of them with two sessions); the
preprocessing uses the fast options (skull-stripped input, no registration, no N4), and one registered
scan checks the ``space`` entity and the transform's name.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.processing import resample_from_to

from simpleslicenet.cli import main
from simpleslicenet.data.bids import BidsDataset
from simpleslicenet.data.preprocess import MANIFEST_NAME, PIPELINE_NAME, TEMPLATE_SPACE, PreprocessSettings
from simpleslicenet.data.preprocess.bids import preprocess_bids

FAST = ["--skull-stripped", "--no-registration", "--no-bias-correction", "--spacing", "4", "--no-progress"]
# The official validator (PyPI's bids-validator-deno), installed beside this Python.
VALIDATOR = Path(sys.executable).parent / "bids-validator-deno"


@pytest.fixture(scope="module")
def bids_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A phantom BIDS dataset: 2 control, 2 reference, 2 patient subjects (one patient with two sessions)."""
    from simpleslicenet.data.phantom.bids import write_phantom_bids

    return write_phantom_bids(
        tmp_path_factory.mktemp("bids") / "dataset", n_control=2, n_reference=2, n_patient=2, spacing_mm=4.0
    )


@pytest.fixture(scope="module")
def derivatives(bids_root: Path) -> Path:
    """``derivatives/simpleslicenet-preprocess`` written by the command with the fast options."""
    main(["preprocess", str(bids_root), *FAST])
    return bids_root / "derivatives" / PIPELINE_NAME


@pytest.fixture(scope="module")
def patients(bids_root: Path) -> set[str]:
    """Labels of the patients (the subjects with lesion masks)."""
    return set(BidsDataset(bids_root, lesion_masks=None).select("group=patient"))


def _validate(folder: Path) -> list[dict]:
    """The validator's errors for ``folder`` as a dataset of its own."""
    if not VALIDATOR.exists():
        pytest.skip("bids-validator-deno is not installed in the virtual environment")
    run = subprocess.run([str(VALIDATOR), str(folder), "--json"], capture_output=True, text=True, check=False)
    issues = json.loads(run.stdout)["issues"]["issues"]
    return [issue for issue in issues if issue["severity"] == "error"]


def test_outputs_are_named_as_bids_derivatives_with_sidecars(
    bids_root: Path, derivatives: Path, patients: set[str]
) -> None:
    raw = sorted(p.relative_to(bids_root) for p in bids_root.glob("sub-*/**/anat/*_T2w.nii.gz"))
    assert len(raw) == 7  # six subjects, one with two sessions
    written = {p.relative_to(derivatives).as_posix() for p in derivatives.rglob("sub-*/**/*") if p.is_file()}
    expected = set()
    for path in raw:
        stem = path.name.removesuffix("_T2w.nii.gz")
        folder = path.parent.as_posix()
        kinds = ["desc-preproc_T2w", "desc-brain_mask"]
        if path.parts[0].removeprefix("sub-") in patients:  # their lesion masks are carried along
            kinds.append("desc-lesion_mask")
        for kind in kinds:
            expected |= {f"{folder}/{stem}_{kind}.nii.gz", f"{folder}/{stem}_{kind}.json"}
    # No registration: the scans stay in their own space (no space entity) and no transform is written.
    assert written == expected

    description = json.loads((derivatives / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "simpleslicenet"
    assert description["DatasetLinks"]["raw"] == "../.."
    assert description["SourceDatasets"] == [{"URL": "../.."}]

    anat = derivatives / "sub-05" / "ses-02" / "anat"
    image = json.loads((anat / "sub-05_ses-02_desc-preproc_T2w.json").read_text())
    assert image["Sources"][0] == "bids:raw:sub-05/ses-02/anat/sub-05_ses-02_T2w.nii.gz"
    assert image["SkullStripped"] is True and image["SimpleSliceNet"]["settings"]["register"] is False
    lesion = json.loads((anat / "sub-05_ses-02_desc-lesion_mask.json").read_text())
    assert lesion["Type"] == "Lesion"
    assert lesion["Sources"][0] == f"bids:raw:derivatives/lesions/{anat.relative_to(derivatives).as_posix()}/" + (
        "sub-05_ses-02_desc-lesion_mask.nii.gz"
    )
    # Same spacing, no registration: the carried mask covers the source mask's voxels in world space.
    source = nib.load(bids_root / lesion["Sources"][0].removeprefix("bids:raw:"))
    carried = nib.load(anat / "sub-05_ses-02_desc-lesion_mask.nii.gz")
    on_grid = np.asarray(resample_from_to(source, carried, order=0).dataobj) > 0
    carried_mask = np.asarray(carried.dataobj) > 0
    dice = 2 * (on_grid & carried_mask).sum() / (on_grid.sum() + carried_mask.sum())
    assert carried_mask.any() and dice >= 0.95
    assert abs(int(carried_mask.sum()) - int((np.asarray(source.dataobj) > 0).sum())) <= 0.03 * carried_mask.sum()


def test_derivatives_pass_the_bids_validator(derivatives: Path) -> None:
    assert _validate(derivatives) == []


def test_reader_reads_the_derivatives_back_with_their_masks(
    bids_root: Path, derivatives: Path, patients: set[str]
) -> None:
    dataset = BidsDataset(bids_root, derivatives=PIPELINE_NAME)
    scans = dataset.scans()
    names = ["sub-01_T2w", "sub-02_T2w", "sub-03_T2w", "sub-04_T2w", "sub-05_ses-01_T2w", "sub-05_ses-02_T2w"]
    assert [scan.name for scan in scans] == [*names, "sub-06_T2w"]
    for scan in scans:
        assert scan.image_path.is_relative_to(derivatives) and scan.image_path.name.endswith("_desc-preproc_T2w.nii.gz")
        assert scan.brain_mask_path is not None and scan.brain_mask_path.is_relative_to(derivatives)
        assert (scan.mask_path is not None) == (scan.subject in patients)
        if scan.mask_path is not None:
            assert scan.mask_path.is_relative_to(derivatives)
        image = nib.load(scan.image_path)
        brain = np.asarray(nib.load(scan.brain_mask_path).dataobj) > 0
        assert image.shape == brain.shape and np.allclose(image.header.get_zooms(), 4.0)
        assert not np.asarray(image.dataobj)[~brain].any()  # zero outside the brain
    assert {scan.subject for scan in dataset.scans("group=patient")} == patients == {"05", "06"}



def test_raw_scans_keep_their_own_masks_beside_a_preprocessed_folder(bids_root: Path, derivatives: Path) -> None:
    """The preprocessed folder's masks (no space entity here) belong to its scans, never to the raw ones."""
    lesions = bids_root / "derivatives" / "lesions"
    for scan in BidsDataset(bids_root).scans():
        assert scan.image_path.is_relative_to(bids_root / f"sub-{scan.subject}")
        assert scan.brain_mask_path is not None and scan.brain_mask_path.is_relative_to(lesions)
        assert scan.mask_path is None or scan.mask_path.is_relative_to(lesions)

def test_rerun_skips_finished_scans_and_redoes_a_deleted_output(bids_root: Path, derivatives: Path) -> None:
    lines: list[str] = []
    settings = PreprocessSettings(skull_stripped=True, register=False, bias_correction=False, spacing_mm=4.0)
    kwargs = {"settings": settings, "progress": False, "log": lines.append}
    before = {p: p.stat().st_mtime_ns for p in derivatives.rglob("*.nii.gz")}
    report = preprocess_bids(bids_root, **kwargs)
    assert [outcome.status for outcome in report.outcomes] == ["skipped"] * 7
    assert {p: p.stat().st_mtime_ns for p in derivatives.rglob("*.nii.gz")} == before

    # A deleted sidecar makes its scan unfinished; only that scan is redone.
    (derivatives / "sub-02" / "anat" / "sub-02_desc-brain_mask.json").unlink()
    report = preprocess_bids(bids_root, participants=["02", "sub-03"], **kwargs)
    statuses = {outcome.name: outcome.status for outcome in report.outcomes}
    assert statuses == {
        "sub-02/anat/sub-02_desc-preproc_T2w.nii.gz": "done",
        "sub-03/anat/sub-03_desc-preproc_T2w.nii.gz": "skipped",
    }
    assert (derivatives / "sub-02" / "anat" / "sub-02_desc-brain_mask.json").is_file()
    manifest = json.loads((derivatives / MANIFEST_NAME).read_text())
    outputs = manifest["scans"]["sub-02/anat/sub-02_desc-preproc_T2w.nii.gz"]["outputs"]
    assert outputs["brain_mask_sidecar"]["path"] == "sub-02/anat/sub-02_desc-brain_mask.json"


def test_registered_outputs_carry_the_template_space_and_pass_the_validator(
    bids_root: Path, tmp_path: Path
) -> None:
    output = tmp_path / "registered"
    quick = ["--skull-stripped", "--quick", "--spacing", "4", "--no-bias-correction", "--no-progress"]
    main(["preprocess", str(bids_root), "--output", str(output), "--participants", "06", *quick])
    anat = output / "sub-06" / "anat"
    kinds = ("preproc_T2w", "brain_mask", "lesion_mask")
    expected = [f"sub-06_space-{TEMPLATE_SPACE}_desc-{kind}.{ext}" for kind in kinds for ext in ("nii.gz", "json")]
    expected.append(f"sub-06_from-T2w_to-{TEMPLATE_SPACE}_mode-image_xfm.txt")
    assert sorted(p.name for p in anat.iterdir()) == sorted(expected)
    image = nib.load(anat / f"sub-06_space-{TEMPLATE_SPACE}_desc-preproc_T2w.nii.gz")
    assert int(image.header["sform_code"]) == 4  # aligned to a template
    assert _validate(output) == []


def test_bids_options_need_a_bids_dataset_and_a_known_selection(bids_root: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(bids_root / "sub-01" / "anat" / "sub-01_T2w.nii.gz", plain / "scan.nii.gz")
    out = ["--output", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match="--participants need a BIDS dataset"):
        main(["preprocess", str(plain), *out, "--participants", "group=control", *FAST])
    with pytest.raises(SystemExit, match=r"participants\.tsv.*no participant has group=healthy"):
        main(["preprocess", str(bids_root), *out, "--participants", "group=healthy", *FAST])
    with pytest.raises(SystemExit, match="--derivatives need --input to be a BIDS dataset"):
        main(["calibrate", "--model", "m.xml", "--input", str(plain), *out, "--derivatives", PIPELINE_NAME])
    with pytest.raises(SystemExit, match="--acquisition, --run need --input to be a BIDS dataset"):
        main(["predict", "--model", "m.xml", "--input", str(plain), *out, "--acquisition", "fast", "--run", "1"])
    # The entities choose scans everywhere: the phantom has no acq- or run- entity, so nothing is chosen.
    with pytest.raises(SystemExit, match=r"no T2w scans"):
        main(["preprocess", str(bids_root), *out, "--run", "2", *FAST])
    with pytest.raises(SystemExit, match=r"no T2w scans"):
        main(["calibrate", "--model", "m.xml", "--input", str(bids_root), *out, "--participants", "group=reference",
              "--acquisition", "fast"])  # fmt: skip
    with pytest.raises(SystemExit, match="--participant-label choose scans at the participant level only"):
        main(["bids", str(bids_root), str(tmp_path / "out"), "group", "--participant-label", "01"])
    assert not (tmp_path / "out").exists()


def test_calibrate_and_predict_take_bids_participants(
    trained_simpleslicenet,  # noqa: ANN001
    bids_root: Path,
    derivatives: Path,
    tmp_path: Path,
) -> None:
    from simpleslicenet.calibration import ConformalCalibration

    _model, _engine, checkpoint = trained_simpleslicenet
    calibration = tmp_path / "calibration.json"
    model = ["--model", str(checkpoint), "--input", str(bids_root), "--derivatives", PIPELINE_NAME]
    with pytest.raises(SystemExit, match="--participants must choose the held-out healthy participants"):
        main(["calibrate", *model, "--output", str(calibration)])
    main(["calibrate", *model, "--output", str(calibration), "--participants", "group=reference"])
    assert ConformalCalibration.load(calibration).n_scans == 2  # sub-03 and sub-04

    out = tmp_path / "predicted"
    main(["predict", *model, "--output", str(out), "--participants", "group=patient", 
          "--calibration", str(calibration)])  # fmt: skip
    scores = json.loads((out / "scores.json").read_text())
    scanned = sorted(Path(record["scan"]).relative_to(derivatives).as_posix() for record in scores["scans"])
    assert scanned == [
        "sub-05/ses-01/anat/sub-05_ses-01_desc-preproc_T2w.nii.gz",
        "sub-05/ses-02/anat/sub-05_ses-02_desc-preproc_T2w.nii.gz",
        "sub-06/anat/sub-06_desc-preproc_T2w.nii.gz",
    ]
    assert all(0 < record["volume_pvalue"] <= 1 for record in scores["scans"])
    assert (out / "sub-05_ses-02_T2w_anomaly_map.nii.gz").is_file()  # outputs named after the raw scan


def test_output_names_are_file_names_of_known_kinds_beside_the_scan(tmp_path: Path) -> None:
    from simpleslicenet.data.nifti import VolumeError
    from simpleslicenet.data.preprocess.scan import output_paths

    settings = PreprocessSettings(register=False)
    scan = tmp_path / "a_desc-preproc_T2w.nii.gz"
    paths = output_paths(scan, settings, True, {"brain_mask": "a_desc-brain_mask.nii.gz"})
    assert paths.brain_mask == tmp_path / "a_desc-brain_mask.nii.gz"
    assert paths.lesion_mask == tmp_path / "a_desc-preproc_T2w_mask.nii.gz"  # the naming rule's, not renamed
    assert paths.transform is None  # not registered
    for names in ({"brain_mask": "sub/a.nii.gz"}, {"image": "b.nii.gz"}, {"lesion_mask": "a_desc-preproc_T2w.nii.gz"}):
        with pytest.raises(VolumeError, match="cannot name its"):
            output_paths(scan, settings, True, names)
