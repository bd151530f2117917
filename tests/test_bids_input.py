"""BIDS in: the phantom written as a BIDS dataset, the reader, selection specs, damaged datasets and the datamodule.

The reader is held to the official validator (``bids-validator-deno``, offline): the phantom passes it,
and for a set of file names the reader accepts exactly those the validator accepts.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

from simpleslicenet.data.bids import BidsDataset, BidsError

VALIDATOR = Path(sys.executable).parent / "bids-validator-deno"
# 4 controls, 2 references, 2 patients; second sessions for both patients and the first control.
PHANTOM_BIDS = {"n_control": 4, "n_reference": 2, "n_patient": 2, "spacing_mm": 4.0, "second_session": 3}
EXPECTED_SCANS = [
    "sub-01_ses-01_T2w", "sub-01_ses-02_T2w", "sub-02_T2w", "sub-03_T2w", "sub-04_T2w", "sub-05_T2w", "sub-06_T2w",
    "sub-07_ses-01_T2w", "sub-07_ses-02_T2w", "sub-08_ses-01_T2w", "sub-08_ses-02_T2w",
]  # fmt: skip
PATIENTS = {"07", "08"}


@pytest.fixture(scope="session")
def bids_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny phantom BIDS dataset (8 participants, 11 T2w scans at 4 mm), generated once."""
    from simpleslicenet.data.phantom import write_phantom_bids

    return write_phantom_bids(tmp_path_factory.mktemp("bids") / "phantom", **PHANTOM_BIDS)


def _validator_report(root: Path, recursive: bool = True) -> dict:
    """The validator's JSON report on ``root`` (derivatives datasets included when ``recursive``)."""
    if not VALIDATOR.is_file():
        pytest.skip(f"the BIDS validator is not installed ({VALIDATOR})")
    command = [str(VALIDATOR), str(root), "--format", "json", *(["--recursive"] if recursive else [])]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    return json.loads(completed.stdout)


def _errors(report: dict) -> dict[str, dict[str, list[str]]]:
    """``{dataset: {location: [error codes]}}``: the errors of the root and of each derivatives dataset."""
    datasets = {"/": report, **report.get("derivativesSummary", {})}
    errors: dict[str, dict[str, list[str]]] = {}
    for name, result in datasets.items():
        for issue in result["issues"]["issues"]:
            if issue["severity"] == "error":
                errors.setdefault(name, {}).setdefault(issue.get("location", ""), []).append(issue["code"])
    return errors


def _reader(root: Path, **kwargs) -> BidsDataset:  # noqa: ANN003
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the phantom leaves nothing to warn about
        return BidsDataset(root, **kwargs)


def test_phantom_bids_passes_the_validator(bids_root: Path) -> None:
    report = _validator_report(bids_root)
    assert _errors(report) == {}
    # The ground-truth masks are a derivatives dataset of their own, and were validated too.
    assert list(report["derivativesSummary"]) == ["/derivatives/lesions/"]
    assert report["summary"]["sessions"] == ["01", "02"]
    description = json.loads((bids_root / "derivatives" / "lesions" / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "simpleslicenet"


def test_reader_finds_the_phantom_scans_and_masks(bids_root: Path) -> None:
    dataset = _reader(bids_root)
    scans = dataset.scans()
    assert [scan.name for scan in scans] == EXPECTED_SCANS
    assert list(dataset.participants.columns) == ["group", "lesion_family"]
    assert dataset.participants.loc["07", "group"] == "patient"
    assert dataset.participants["lesion_family"].isna().sum() == 6  # "n/a" for the healthy
    masks = bids_root / "derivatives" / "lesions"
    for scan in scans:
        assert scan.image_path == scan.source_path
        assert scan.source_path == bids_root / scan.derivative_folder() / f"{scan.name}.nii.gz"
        assert scan.brain_mask_path == masks / scan.derivative_folder() / scan.derivative_name("brain", "mask")
        if scan.subject in PATIENTS:
            assert scan.mask_path == masks / scan.derivative_folder() / scan.derivative_name("lesion", "mask")
        else:
            assert scan.mask_path is None
        assert scan.files().name == scan.name
    first = scans[0]
    assert (first.subject, first.session, first.suffix) == ("01", "01", "T2w")
    assert first.entities == {"sub": "01", "ses": "01"}
    assert first.derivative_folder() == Path("sub-01/ses-01/anat")
    assert first.derivative_name("anomaly", "mask") == "sub-01_ses-01_desc-anomaly_mask.nii.gz"
    assert first.derivative_name("preproc", "T2w", space="MNI") == "sub-01_ses-01_space-MNI_desc-preproc_T2w.nii.gz"
    assert scans[2].session is None and scans[2].derivative_folder() == Path("sub-02/anat")
    # Entity filters.
    assert [scan.name for scan in _reader(bids_root, session="02").scans()] == [
        "sub-01_ses-02_T2w", "sub-07_ses-02_T2w", "sub-08_ses-02_T2w",
    ]  # fmt: skip
    assert _reader(bids_root, acquisition="fast").scans() == []
    assert _reader(bids_root, run=1).scans() == []  # no scan has a run entity
    assert _reader(bids_root, suffix="T1w").scans() == []
    assert all(scan.mask_path is None for scan in _reader(bids_root, lesion_masks=None).scans())


def test_selection_specs(bids_root: Path) -> None:
    dataset = _reader(bids_root)
    assert dataset.select(None) == ["01", "02", "03", "04", "05", "06", "07", "08"]
    assert dataset.select("group=control") == ["01", "02", "03", "04"]
    assert dataset.select("group=reference,patient") == ["05", "06", "07", "08"]
    assert dataset.select(["sub-03", "01"]) == ["01", "03"]
    assert dataset.select("sub-02 05") == ["02", "05"]
    assert dataset.select("participant_id=sub-04,06") == ["04", "06"]
    assert [scan.name for scan in dataset.scans("group=reference")] == ["sub-05_T2w", "sub-06_T2w"]
    for spec, missing in (("diagnosis=control", "'diagnosis'"), ("group=healthy", "group=healthy"), (["09"], "sub-09")):
        with pytest.raises(BidsError, match="participants.tsv") as caught:
            dataset.select(spec)
        assert missing in str(caught.value)


def _rename(root: Path, folder: str, old: str, new: str) -> None:
    (root / folder / old).rename(root / folder / new)


def _drop_participant(root: Path) -> None:
    lines = (root / "participants.tsv").read_text().splitlines()
    (root / "participants.tsv").write_text("\n".join(line for line in lines if not line.startswith("sub-03")) + "\n")


def _copy_mask(root: Path, name: str) -> None:
    folder = root / "derivatives" / "lesions" / "sub-07" / "ses-01" / "anat"
    shutil.copy(folder / "sub-07_ses-01_desc-lesion_mask.nii.gz", folder / name)


DAMAGES: dict[str, tuple[Callable[[Path], None], list[str]]] = {
    "no dataset_description.json": (
        lambda root: (root / "dataset_description.json").unlink(),
        ["not a BIDS dataset: no dataset_description.json"],
    ),
    "subject not in participants.tsv": (_drop_participant, ["participants.tsv", "sub-03"]),
    "file of another subject": (
        lambda root: _rename(root, "sub-02/anat", "sub-02_T2w.nii.gz", "sub-03_T2w.nii.gz"),
        ["sub-02/anat/sub-03_T2w.nii.gz", "sub-03", "folder sub-02"],
    ),
    "session not in the file name": (
        lambda root: _rename(root, "sub-01/ses-02/anat", "sub-01_ses-02_T2w.nii.gz", "sub-01_T2w.nii.gz"),
        ["sub-01/ses-02/anat/sub-01_T2w.nii.gz", "ses-02"],
    ),
    "entities out of order": (
        lambda root: _rename(root, "sub-02/anat", "sub-02_T2w.nii.gz", "sub-02_run-1_acq-x_T2w.nii.gz"),
        ["sub-02_run-1_acq-x_T2w.nii.gz", "out of order"],
    ),
    "lesion mask for a non-existing scan": (
        lambda root: _copy_mask(root, "sub-07_ses-01_run-2_desc-lesion_mask.nii.gz"),
        ["sub-07_ses-01_run-2_desc-lesion_mask.nii.gz", "scan the dataset does not have"],
    ),
    "two lesion masks for one scan": (
        lambda root: _copy_mask(root, "sub-07_ses-01_desc-lesion_mask.nii"),
        ["two lesion masks", "sub-07_ses-01_desc-lesion_mask.nii"],
    ),
    "badly named lesion mask": (
        lambda root: _copy_mask(root, "sub-07_ses-01_desc-lesion_seg-1_mask.nii.gz"),
        ["sub-07_ses-01_desc-lesion_seg-1_mask.nii.gz", "'seg'"],
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_datasets_give_a_bids_error_naming_the_problem(bids_root: Path, tmp_path: Path, damage: str) -> None:
    root = shutil.copytree(bids_root, tmp_path / "damaged")
    change, fragments = DAMAGES[damage]
    change(root)
    with pytest.raises(BidsError) as caught:
        BidsDataset(root, lesion_masks="lesions")  # a folder named: its problems are errors
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_a_participant_without_a_folder_is_a_warning(bids_root: Path, tmp_path: Path) -> None:
    root = shutil.copytree(bids_root, tmp_path / "extra")
    with (root / "participants.tsv").open("a") as handle:
        handle.write("sub-09\tcontrol\tn/a\n")
    with pytest.warns(UserWarning, match="sub-09"):
        dataset = BidsDataset(root)
    assert "09" not in dataset.select("group=control")


def test_bidsignore_hides_files_from_the_reader(bids_root: Path, tmp_path: Path) -> None:
    root = shutil.copytree(bids_root, tmp_path / "ignore")
    shutil.copytree(root / "sub-03", root / "sub-03_backup")
    with pytest.raises(BidsError, match="sub-03_backup: folder label '03_backup'"):
        BidsDataset(root)
    (root / ".bidsignore").write_text("sub-03_backup/\n")
    shutil.copy(root / "sub-02/anat/sub-02_T2w.nii.gz", root / "sub-02/anat/sub-02_T2w_old.nii.gz")
    with pytest.warns(UserWarning, match="sub-02_T2w_old.nii.gz"):
        BidsDataset(root)
    (root / ".bidsignore").write_text("# kept for the record\n*_old.nii.gz\nsub-03_backup/\n")
    assert [scan.name for scan in _reader(root).scans()] == EXPECTED_SCANS


def test_masks_offered_by_two_derivatives_folders(bids_root: Path, tmp_path: Path) -> None:
    root = shutil.copytree(bids_root, tmp_path / "two")
    second = root / "derivatives" / "manual" / "sub-07" / "ses-01" / "anat"
    second.mkdir(parents=True)
    shutil.copy(root / "derivatives/lesions/sub-07/ses-01/anat/sub-07_ses-01_desc-lesion_mask.nii.gz", second)
    with pytest.raises(BidsError, match=r"several derivatives folders \(lesions, manual\)"):
        BidsDataset(root)
    # Only a scan that is read needs its mask to be unambiguous.
    assert len(_reader(root, session="02").scans()) == 3
    for kwargs in ({"lesion_masks": "lesions"}, {"exclude_derivatives": ["manual"]}):
        patients = [scan for scan in _reader(root, **kwargs).scans() if scan.mask_path is not None]
        assert all(scan.mask_path.is_relative_to(root / "derivatives" / "lesions") for scan in patients)
        assert len(patients) == 4
    manual = _reader(root, lesion_masks="manual").scans()
    assert [scan.name for scan in manual if scan.mask_path is not None] == ["sub-07_ses-01_T2w"]
    assert all(scan.brain_mask_path is None for scan in manual)


def test_preprocessed_scans_and_their_masks_come_from_the_derivatives_folder(bids_root: Path, tmp_path: Path) -> None:
    root = shutil.copytree(bids_root, tmp_path / "prep")
    dataset = _reader(root)
    pipeline = root / "derivatives" / "prep"
    for scan in dataset.scans():
        folder = pipeline / scan.derivative_folder()
        folder.mkdir(parents=True, exist_ok=True)
        for space in ("MNI", "orig"):
            shutil.copy(scan.source_path, folder / scan.derivative_name("preproc", "T2w", space=space))
        shutil.copy(scan.brain_mask_path, folder / scan.derivative_name("brain", "mask", space="MNI"))
    (pipeline / "dataset_description.json").write_text('{"Name": "prep", "BIDSVersion": "1.10.0"}')
    with pytest.raises(BidsError, match="two preprocessed scans of one source"):
        BidsDataset(root, derivatives="prep")
    mni = _reader(root, derivatives="prep", space="MNI").scans()
    assert [scan.name for scan in mni] == EXPECTED_SCANS
    for scan in mni:
        assert scan.image_path.parent == pipeline / scan.derivative_folder()
        assert scan.image_path.name == scan.derivative_name("preproc", "T2w", space="MNI")
        assert scan.source_path == root / scan.derivative_folder() / f"{scan.name}.nii.gz"
        brain = scan.derivative_name("brain", "mask", space="MNI")
        assert scan.brain_mask_path == pipeline / scan.derivative_folder() / brain
        # The lesion masks lie in the raw scans' space, not in MNI: not paired with these scans.
        assert scan.mask_path is None
    # A preprocessed scan without a space entity still takes its masks from its own folder only (it may
    # have been resampled): the raw-space masks come only from a folder named explicitly.
    for scan in mni:
        scan.image_path.rename(scan.image_path.with_name(scan.derivative_name("preproc", "T2w")))
    for path in pipeline.rglob("*space-orig*"):
        path.unlink()
    for path in pipeline.rglob("*space-MNI_desc-brain_mask*"):
        path.unlink()
    own_only = _reader(root, derivatives="prep").scans()
    assert all(scan.mask_path is None and scan.brain_mask_path is None for scan in own_only)
    assert _reader(root, derivatives="prep", lesion_masks=None).scans() == own_only
    named = _reader(root, derivatives="prep", lesion_masks="lesions").scans()
    assert [scan.subject for scan in named if scan.mask_path is not None] == ["07", "07", "08", "08"]
    assert all(scan.brain_mask_path.is_relative_to(root / "derivatives" / "lesions") for scan in named)
    # The datamodule trains on the preprocessed scans, named after their sources.
    from simpleslicenet.data.datamodules import BIDS

    with pytest.warns(UserWarning, match="left out"):
        samples = BIDS(root=root, derivatives="prep", lesion_masks="lesions").make_samples()
    assert all(Path(path).is_relative_to(pipeline) for path in samples["image_path"])
    lesion_ids = set(samples.loc[samples["label_index"] == 1, "volume_id"])
    assert lesion_ids == {name for name in EXPECTED_SCANS if name.startswith(("sub-07", "sub-08"))}


def test_masks_pair_with_the_scan_on_the_same_grid(bids_root: Path, tmp_path: Path) -> None:
    """``res`` is part of the grid: a mask at another resolution is not the scan's, and masks of
    preprocessed scans never come from the raw masks' folder unless it is named."""
    root = shutil.copytree(bids_root, tmp_path / "grid")
    pipeline = root / "derivatives" / "prep"
    pipeline.mkdir()
    (pipeline / "dataset_description.json").write_text('{"Name": "prep", "BIDSVersion": "1.10.0"}')
    scans = _reader(root).scans()
    for scan in scans:
        folder = pipeline / scan.derivative_folder()
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(scan.source_path, folder / scan.derivative_name("preproc", "T2w", space="MNI") .replace(
            "space-MNI_", "space-MNI_res-2_"))
        for res in ("1", "2"):
            name = scan.derivative_name("brain", "mask", space="MNI").replace("space-MNI_", f"space-MNI_res-{res}_")
            shutil.copy(scan.brain_mask_path, folder / name)
    read = _reader(root, derivatives="prep").scans()
    assert [scan.name for scan in read] == EXPECTED_SCANS
    assert all("_res-2_desc-brain_mask" in scan.brain_mask_path.name for scan in read)
    assert all(scan.mask_path is None for scan in read)  # the raw-space lesion masks are not these scans'


def test_masks_of_other_tools_do_not_break_the_dataset(bids_root: Path, tmp_path: Path) -> None:
    """A subject-level mask of another pipeline for a subject with sessions has no scan: in "auto" mode it
    is left out with a warning, in a folder named it is an error."""
    root = shutil.copytree(bids_root, tmp_path / "tools")
    other = root / "derivatives" / "fmriprep" / "sub-01" / "anat"
    other.mkdir(parents=True)
    shutil.copy(root / "derivatives/lesions/sub-02/anat/sub-02_desc-brain_mask.nii.gz",
                other / "sub-01_desc-brain_mask.nii.gz")  # fmt: skip
    shutil.copy(root / "derivatives/lesions/sub-02/anat/sub-02_desc-brain_mask.nii.gz",
                other / "sub-01_desc-brain_hemi-L_mask.nii.gz")  # fmt: skip
    with pytest.warns(UserWarning, match="sub-01_desc-brain_mask.nii.gz") as caught:
        dataset = BidsDataset(root)
    assert any("sub-01_desc-brain_hemi-L_mask.nii.gz" in str(warning.message) for warning in caught)
    assert [scan.name for scan in dataset.scans()] == EXPECTED_SCANS
    assert all(scan.brain_mask_path.is_relative_to(root / "derivatives" / "lesions") for scan in dataset.scans())
    with pytest.raises(BidsError, match="sub-01_desc-brain_hemi-L_mask.nii.gz: entity 'hemi' is out of order"):
        BidsDataset(root, lesion_masks="fmriprep")
    (other / "sub-01_desc-brain_hemi-L_mask.nii.gz").unlink()
    with pytest.raises(BidsError, match="sub-01_desc-brain_mask.nii.gz: brain mask of a scan the dataset does not"):
        BidsDataset(root, lesion_masks="fmriprep")


def test_chosen_participants_without_a_scan_are_named(bids_root: Path, tmp_path: Path) -> None:
    dataset = _reader(bids_root, session="02")
    with pytest.warns(UserWarning, match=r"no T2w scan \(session=02\) for the chosen sub-02, sub-03"):
        scans = dataset.scans(["01", "02", "03"])
    assert [scan.name for scan in scans] == ["sub-01_ses-02_T2w"]
    with pytest.warns(UserWarning, match="sub-01, sub-02, sub-03, sub-04"):
        assert _reader(bids_root, suffix="T1w").scans("group=control") == []


def test_participants_tsv_is_read_leniently_and_needed_only_for_columns(bids_root: Path, tmp_path: Path) -> None:
    root = shutil.copytree(bids_root, tmp_path / "participants")
    table = (root / "participants.tsv").read_text().replace("\tcontrol\t", "\tcontrol \t").replace("sub-02", " sub-02")
    (root / "participants.tsv").write_text(table)
    dataset = _reader(root)
    assert dataset.select("group=control") == ["01", "02", "03", "04"]
    assert dataset.participants["lesion_family"].isna().sum() == 6
    (root / "participants.tsv").write_text(table + "n/a\tcontrol\tn/a\n")
    with pytest.raises(BidsError, match="participant_id 'n/a' is not sub-<label>"):
        BidsDataset(root)
    (root / "participants.tsv").unlink()
    dataset = _reader(root)  # BIDS only recommends participants.tsv
    assert dataset.select(None) == ["01", "02", "03", "04", "05", "06", "07", "08"]
    assert [scan.name for scan in dataset.scans(["sub-02", "05"])] == ["sub-02_T2w", "sub-05_T2w"]
    with pytest.raises(BidsError, match="participants.tsv: missing: selection 'group=control'"):
        dataset.select("group=control")
    with pytest.raises(BidsError, match="no subject folder for sub-09"):
        dataset.select(["09"])


def test_scans_are_hashable(bids_root: Path) -> None:
    scans = _reader(bids_root).scans()
    assert len(set(scans)) == len(scans)
    assert len(set(scans) | set(_reader(bids_root).scans())) == len(scans)


# File names in sub-01/anat (no session folder) and whether BIDS allows them there.
NAMES = {
    "sub-01_T2w.nii.gz": True,
    "sub-01_acq-fast_T2w.nii.gz": True,
    "sub-01_run-2_T2w.nii.gz": True,
    "sub-01_task-rest_T2w.nii.gz": True,
    "sub-01_ce-gad_rec-norm_run-1_T2w.nii.gz": True,
    "sub-01_acq-fast_FLAIR.nii.gz": True,
    "sub-01_part-mag_T1w.nii.gz": True,
    "sub-01_PDw.nii": True,
    "sub-01_mod-T2w_defacemask.nii.gz": True,  # masks and file collections of the schema
    "sub-01_inv-1_MP2RAGE.nii.gz": True,
    "sub-01_echo-1_MEGRE.nii.gz": True,
    "sub-01_flip-1_VFA.nii.gz": True,
    "sub-01_flip-2_mt-on_MTS.nii.gz": True,
    "sub-01_inv-2_part-mag_IRT1.nii.gz": True,
    "sub-01_UNIT1.nii.gz": True,
    "sub-01_T1map.nii.gz": True,
    "sub-01_MEGRE.nii.gz": False,  # a MEGRE file needs echo
    "sub-01_echo-1_T1map.nii.gz": False,  # no echo for parametric maps
    "sub-01_run-x_T2w.nii.gz": False,  # a run is a number
    "sub-01_foo-1_T2w.nii.gz": False,  # unknown entity
    "sub-01_run-1_acq-x_T2w.nii.gz": False,  # out of order
    "sub-01_acq-fast_acq-slow_T2w.nii.gz": False,  # an entity twice
    "sub-01_acq-a_b_T2w.nii.gz": False,  # underscore inside a label
    "sub-01_acq-a-b_T2w.nii.gz": False,  # dash inside a label
    "sub-01_desc-x_T2w.nii.gz": False,  # derivative entity in raw data
    "sub-01_space-MNI_T2w.nii.gz": False,
    "sub-01_T2wx.nii.gz": False,  # unknown suffix
    "sub-01_acq-fast.nii.gz": False,  # no suffix
    "sub-01_bold.nii.gz": False,  # not an anatomical suffix
    "T2w.nii.gz": False,  # no subject
    "sub-02_T2w.nii.gz": False,  # another subject's folder
    "sub-01_ses-01_T2w.nii.gz": False,  # a session without a session folder
}


def _one_subject(root: Path, source: Path, names: list[str]) -> Path:
    (root / "sub-01" / "anat").mkdir(parents=True)
    (root / "dataset_description.json").write_text('{"Name": "names", "BIDSVersion": "1.10.0"}')
    (root / "participants.tsv").write_text("participant_id\nsub-01\n")
    for name in names:
        shutil.copy(source, root / "sub-01" / "anat" / name)
    return root


def test_the_reader_accepts_exactly_the_names_the_validator_accepts(bids_root: Path, tmp_path: Path) -> None:
    source = bids_root / "sub-02" / "anat" / "sub-02_T2w.nii.gz"
    combined = _one_subject(tmp_path / "all", source, list(NAMES))
    errors = _errors(_validator_report(combined, recursive=False)).get("/", {})
    # The reader judges names, not sidecar metadata (file collections require keys such as FlipAngle).
    naming = {location for location, codes in errors.items() if any(not c.startswith("SIDECAR_") for c in codes)}
    validator = {name: f"/sub-01/anat/{name}" not in naming for name in NAMES}
    reader = {}
    for index, name in enumerate(NAMES):
        # Files of the contrast read must be well named; others that are not are left out with a warning.
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            try:
                BidsDataset(_one_subject(tmp_path / f"one{index}", source, [name]), suffix="T2w")
            except (BidsError, UserWarning):
                reader[name] = False
            else:
                reader[name] = True
    assert validator == NAMES
    assert reader == validator


def test_datamodule_splits_by_participant(bids_root: Path) -> None:
    from simpleslicenet.data.datamodules import BIDS

    datamodule = BIDS(root=bids_root, target_shape=(32, 32, 16), healthy_test_fraction=0.5)
    with pytest.warns(UserWarning, match="left out: sub-05_T2w, sub-06_T2w"):
        samples = datamodule.split_samples()
    by_id = samples.set_index("volume_id")
    assert sorted(by_id.index) == [name for name in EXPECTED_SCANS if not name.startswith(("sub-05", "sub-06"))]
    train = samples[samples["split"] == "train"]
    assert set(train["label_index"]) == {0} and set(train["subject"]) <= {"01", "02", "03", "04"}
    assert len(set(train["subject"])) == 2  # half of the four controls
    healthy_held_out = samples[(samples["split"] != "train") & (samples["label_index"] == 0)]
    assert len(set(healthy_held_out["subject"])) == 2
    # Both sessions of sub-01 fall on the same side of training.
    assert len({by_id.loc[name, "split"] == "train" for name in ("sub-01_ses-01_T2w", "sub-01_ses-02_T2w")}) == 1
    # Validation and calibration are carved out scan by scan; a participant's sessions still share a split.
    for seed in range(8):
        carved = BIDS(root=bids_root, healthy_test_fraction=0.5, val_fraction=0.5, calibration_fraction=0.5, seed=seed)
        with pytest.warns(UserWarning, match="left out"):
            splits = carved.split_samples().groupby("subject")["split"].nunique()
        assert (splits == 1).all(), splits
    lesions = samples[samples["label_index"] == 1]
    assert set(lesions["subject"]) == PATIENTS and len(lesions) == 4
    assert set(lesions["split"]) <= {"test", "val"} and lesions["mask_path"].notna().all()
    assert samples["brain_mask_path"].notna().all()
    assert datamodule.preprocessing.modality == "t2"
    # Healthy as a list of labels: the references train too, nothing is left out.
    everyone = BIDS(root=bids_root, healthy=["01", "02", "03", "04", "05", "06"], healthy_test_fraction=0.25)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        samples = everyone.make_samples()
    assert len(samples) == len(EXPECTED_SCANS)
    with pytest.raises(BidsError, match="participants.tsv"):
        BIDS(root=bids_root, healthy="group=controls").make_samples()


def test_datamodule_sets_up_and_loads_a_volume(bids_root: Path) -> None:
    from simpleslicenet.data.datamodules import BIDS

    datamodule = BIDS(root=bids_root, target_shape=(48, 48, 16), lesion_masks="lesions")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the left-out references
        datamodule.setup()
        batch = next(iter(datamodule.test_dataloader()))
    assert datamodule.preprocessing.spacing_mm == pytest.approx(4.0)
    assert batch.image.shape == (16, 3, 48, 48)


def test_phantom_command_writes_a_bids_dataset(tmp_path: Path) -> None:
    from simpleslicenet.cli import main

    out = tmp_path / "cli"
    main(["phantom", "--bids", "--out", str(out), "--healthy", "2", "--reference", "1", "--lesion", "1",
          "--spacing", "4", "--second-session", "1"])  # fmt: skip
    dataset = _reader(out)
    assert [scan.name for scan in dataset.scans()] == [
        "sub-01_T2w", "sub-02_T2w", "sub-03_T2w", "sub-04_ses-01_T2w", "sub-04_ses-02_T2w",
    ]  # fmt: skip
    assert dataset.select("group=patient") == ["04"]
    # Writing again replaces the dataset; a folder holding anything else is refused.
    main(["phantom", "--bids", "--out", str(out), "--healthy", "1", "--reference", "0", "--lesion", "1",
          "--spacing", "4", "--second-session", "0"])  # fmt: skip
    assert [scan.name for scan in _reader(out).scans()] == ["sub-01_T2w", "sub-02_T2w"]
    (tmp_path / "other" / "notes").mkdir(parents=True)
    with pytest.raises(SystemExit, match="holds files a phantom BIDS dataset does not \\(notes\\)"):
        main(["phantom", "--bids", "--out", str(tmp_path / "other"), "--spacing", "4"])
    # A real BIDS dataset, whose entries all look like a phantom's, is not the phantom: left untouched.
    real = tmp_path / "real"
    (real / "sub-01" / "anat").mkdir(parents=True)
    shutil.copy(out / "sub-01" / "anat" / "sub-01_T2w.nii.gz", real / "sub-01" / "anat")
    (real / "dataset_description.json").write_text('{"Name": "my study", "BIDSVersion": "1.10.0"}')
    (real / "participants.tsv").write_text("participant_id\nsub-01\n")
    before = sorted(path.relative_to(real) for path in real.rglob("*"))
    with pytest.raises(SystemExit, match="does not name a phantom BIDS dataset"):
        main(["phantom", "--bids", "--out", str(real), "--spacing", "4"])
    assert sorted(path.relative_to(real) for path in real.rglob("*")) == before
    # The BIDS-only counts are refused without --bids instead of being ignored.
    for flag in ("--reference", "--second-session"):
        with pytest.raises(SystemExit, match=f"{flag} only apply to a BIDS dataset: add --bids"):
            main(["phantom", "--out", str(tmp_path / "folder"), flag, "2"])
    assert not (tmp_path / "folder").exists()


@pytest.mark.slow
def test_anomalib_knows_the_bids_datamodule_by_name(bids_root: Path) -> None:
    import simpleslicenet
    from anomalib.data import get_datamodule

    simpleslicenet.register()  # idempotent, and adds names only: the rest of the suite is unaffected
    datamodule = get_datamodule({"class_path": "BIDS", "init_args": {"root": str(bids_root)}})
    assert (type(datamodule).__name__, datamodule.healthy) == ("BIDS", "group=control")
