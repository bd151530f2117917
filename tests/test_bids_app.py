"""The BIDS App: ``simpleslicenet bids BIDS_DIR OUTPUT_DIR participant|group`` on a phantom BIDS dataset.

One tiny SimpleSliceNet (the session's, exported to OpenVINO) and a calibration on the dataset's held-out
``reference`` participants; the derivatives must pass the BIDS validator, and every number in a sidecar,
the group table and a report must equal what ``predict`` says for the same scan.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import children_running

from simpleslicenet.atomic import TEMP_PREFIX
from simpleslicenet.bids import ParticipantOptions, run_participant
from simpleslicenet.bids.derivatives import RECORD_KEY
from simpleslicenet.clusters import cluster_sizes_ml, cluster_table

BIN = Path(sys.executable).parent
SELECTED = "group=control,patient"
FDR = "0.3"  # 4 calibration scans cannot give a mask at 0.05


def _main(*args: str) -> None:
    from simpleslicenet.cli import main

    main([str(arg) for arg in args])


@pytest.fixture(scope="module")
def bids_app(trained_simpleslicenet, tmp_path_factory: pytest.TempPathFactory) -> dict:  # noqa: ANN001
    """A phantom BIDS dataset, the session's model exported, its calibration, and one participant + group run."""
    from simpleslicenet.data.phantom.bids import write_phantom_bids
    from simpleslicenet.deploy import calibrate_paths
    from simpleslicenet.deploy.predict import bids_scan_files

    work = tmp_path_factory.mktemp("bids_app")
    model, _engine, _checkpoint = trained_simpleslicenet
    xml = Path(model.to_openvino(work / "export"))
    root = write_phantom_bids(work / "bids", n_control=2, n_reference=4, n_patient=2, spacing_mm=4.0, seed=0)
    calibration = work / "calibration.json"
    calibrate_paths(xml, bids_scan_files(root, participants="group=reference"), calibration, progress=False)
    out = work / "derivatives"
    _main("bids", root, out, "participant", "--model", xml, "--calibration", calibration, "--fdr", FDR,
          "--participants", SELECTED, "--no-progress")  # fmt: skip
    _main("bids", root, out, "group")
    return {"root": root, "xml": xml, "calibration": calibration, "out": out, "work": work}


def _records(out: Path) -> dict[str, dict]:
    records = {}
    for path in sorted(out.glob("sub-*/**/anat/*_desc-anomaly_T2w.json")):
        record = json.loads(path.read_text())[RECORD_KEY]
        records[record["scan"]] = record
    return records


def _numbers(page: str) -> dict[str, str]:
    """``data-field`` -> ``data-value`` of every number on a report page (the first of each field)."""
    found: dict[str, str] = {}
    for field, value in re.findall(r'data-field="([^"]+)" data-value="([^"]*)"', page):
        found.setdefault(field, value)
    return found


def test_cluster_table_lists_sizes_and_peaks_largest_first() -> None:
    flagged = np.zeros((6, 6, 6), dtype=bool)
    flagged[0, 0, 0] = True
    flagged[3:5, 3:5, 3] = True
    scores = np.arange(216, dtype=float).reshape(6, 6, 6)
    pvalues = 1.0 / (1.0 + scores)
    table = cluster_table(flagged, scores, 0.5, pvalues)
    assert [c["size_ml"] for c in table] == list(cluster_sizes_ml(flagged, 0.5)) == [2.0, 0.5]
    assert table[0]["peak_index"] == [4, 4, 3] and table[0]["peak_score"] == scores[4, 4, 3]
    assert table[0]["peak_pvalue"] == pvalues[4, 4, 3] and [c["id"] for c in table] == [1, 2]


def test_participant_and_group_write_a_valid_derivatives_dataset(bids_app: dict) -> None:
    out, root = bids_app["out"], bids_app["root"]
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "simpleslicenet" and description["GeneratedBy"][0]["Version"]
    assert (out / description["SourceDatasets"][0]["URL"]).resolve() == root.resolve()  # a relative path

    records = _records(out)
    patients_and_controls = {"sub-01_T2w", "sub-02_T2w", "sub-07_ses-01_T2w", "sub-07_ses-02_T2w", "sub-08_T2w"}
    assert set(records) == patients_and_controls  # reference participants were not selected
    for record in records.values():
        for path in record["files"].values():
            assert (out / path).is_file(), path
        assert record["model"]["sha256"] and record["calibration"]["n_scans"] == 4 and record["fdr"] == float(FDR)
    assert (out / "sub-07/ses-02/anat/sub-07_ses-02_desc-pvalue_T2w.nii.gz").is_file()

    validated = subprocess.run([str(BIN / "bids-validator-deno"), str(out), "--json"], capture_output=True,
                               text=True, timeout=120, check=False)  # fmt: skip
    issues = json.loads(validated.stdout)["issues"]["issues"]
    errors = [(issue["code"], issue.get("location")) for issue in issues if issue["severity"] == "error"]
    assert not errors and validated.returncode == 0
    assert not [issue for issue in issues if issue["code"] == "NIFTI_UNIT"]  # the maps say their units: mm
    for record in records.values():
        assert nib.load(out / record["files"]["map"]).header.get_xyzt_units()[0] == "mm"

    with (out / "group_scores.tsv").open() as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert {row["scan"] for row in rows} == patients_and_controls
    keys = [(float(row["volume_pvalue"]), -float(row["volume_score"])) for row in rows]
    assert keys == sorted(keys)
    assert {row["group"] for row in rows} == {"control", "patient"}
    assert set(json.loads((out / "group_scores.json").read_text())) == set(rows[0])
    page = (out / "group_report.html").read_text()
    links = re.findall(r'href="(sub-[^"]+\.html)"', page)
    assert links and all((out / link).is_file() for link in links)
    assert {Path(link).stem for link in links} == patients_and_controls


def test_every_number_equals_what_predict_says(bids_app: dict, tmp_path: Path) -> None:
    from simpleslicenet.deploy import predict_paths
    from simpleslicenet.deploy.predict import bids_scan_files

    scans = bids_scan_files(bids_app["root"], participants=SELECTED)
    predicted = predict_paths(bids_app["xml"], scans, tmp_path / "predict", calibration=bids_app["calibration"],
                              fdr=float(FDR), progress=False)  # fmt: skip
    scores = json.loads((tmp_path / "predict" / "scores.json").read_text())
    assert predicted.ok and len(scores["scans"]) == 5
    records = _records(bids_app["out"])
    with (bids_app["out"] / "group_scores.tsv").open() as handle:
        rows = {row["scan"]: row for row in csv.DictReader(handle, delimiter="\t")}
    flagged_somewhere = False
    for expected in scores["scans"]:
        name = Path(expected["scan"]).name.removesuffix(".nii.gz")
        record = records[name]
        assert record["volume_score"] == expected["volume_score"]
        assert record["volume_pvalue"] == expected["volume_pvalue"]
        assert record["slice_scores"] == expected["slice_scores"]
        assert [c["size_ml"] for c in record["clusters"]] == expected["cluster_sizes_ml"]
        assert float(rows[name]["volume_score"]) == expected["volume_score"]
        assert float(rows[name]["volume_pvalue"]) == expected["volume_pvalue"]
        assert int(rows[name]["clusters"]) == expected["clusters"]
        # The maps are predict's, voxel for voxel, under BIDS names.
        ours = nib.load(bids_app["out"] / record["files"]["map"]).get_fdata()
        np.testing.assert_array_equal(ours, nib.load(expected["map_path"]).get_fdata())
        mask = nib.load(bids_app["out"] / record["files"]["mask"]).get_fdata()
        np.testing.assert_array_equal(mask, nib.load(expected["mask_path"]).get_fdata())
        page = _numbers((bids_app["out"] / record["files"]["report"]).read_text())
        assert page["volume_score"] == repr(expected["volume_score"])
        assert page["volume_pvalue"] == repr(expected["volume_pvalue"])
        for index, cluster in enumerate(record["clusters"]):
            flagged_somewhere = True
            assert page[f"clusters.{index}.size_ml"] == repr(cluster["size_ml"])
            assert page[f"clusters.{index}.peak_score"] == repr(cluster["peak_score"])
            # The peak voxel is where the written map holds the peak score.
            assert ours[tuple(cluster["peak_voxel"])] == pytest.approx(cluster["peak_score"], rel=1e-6)
            assert mask[tuple(cluster["peak_voxel"])] == 1
    assert flagged_somewhere  # the comparison covered clusters


def test_rerun_skips_finished_scans_and_a_bad_scan_does_not_stop_the_others(bids_app: dict, tmp_path: Path) -> None:
    root = tmp_path / "bids"
    shutil.copytree(bids_app["root"], root)
    damaged = root / "sub-02" / "anat" / "sub-02_T2w.nii.gz"
    damaged.write_bytes(b"not a NIfTI file" * 10)
    out = tmp_path / "derivatives"
    args = ["bids", root, out, "participant", "--model", bids_app["xml"], "--participant-label", "01", "02", "08",
            "--no-progress", "--no-reports"]  # fmt: skip
    with pytest.raises(SystemExit, match=r"1 scans failed: sub-02_T2w"):
        _main(*args)
    assert {p.name for p in out.glob("sub-*/anat/*.nii.gz")} == {"sub-01_desc-anomaly_T2w.nii.gz",
                                                                 "sub-08_desc-anomaly_T2w.nii.gz"}  # fmt: skip
    assert not (out / "sub-02").exists() and not [p for p in out.rglob("*") if p.name.startswith(TEMP_PREFIX)]
    before = (out / "sub-01" / "anat" / "sub-01_desc-anomaly_T2w.nii.gz").stat().st_mtime_ns
    _main("bids", root, out, "group")
    with (out / "group_scores.tsv").open() as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert [(row["scan"], row["status"]) for row in rows][-1] == ("sub-02_T2w", "failed") and len(rows) == 3
    assert "sub-02_T2w.nii.gz" in rows[-1]["error"]

    options = ParticipantOptions(str(bids_app["xml"]), reports=False)
    report = run_participant(root, out, options, participants=["01", "sub-02", "08"], progress=False)
    assert sorted(report.skipped) == ["sub-01_T2w", "sub-08_T2w"] and not report.done
    assert [failure["name"] for failure in report.failed] == ["sub-02_T2w"]
    assert (out / "sub-01" / "anat" / "sub-01_desc-anomaly_T2w.nii.gz").stat().st_mtime_ns == before

    # Another option redoes the scans; the group table lists the failed one after the others.
    shutil.copy(bids_app["root"] / "sub-01" / "anat" / "sub-01_T2w.nii.gz", damaged)  # repaired (another scan)
    report = run_participant(root, out, ParticipantOptions(str(bids_app["xml"]), threshold=0.5, reports=False),
                             participants=["01", "02"], progress=False)  # fmt: skip
    assert sorted(report.done) == ["sub-01_T2w", "sub-02_T2w"] and report.ok
    assert (out / "sub-01" / "anat" / "sub-01_desc-anomaly_mask.nii.gz").is_file()
    assert (out / "sub-08" / "anat" / "sub-08_desc-anomaly_T2w.nii.gz").is_file()  # untouched subject kept


def test_stopping_a_bids_run_stops_its_workers(bids_app: dict, tmp_path: Path) -> None:
    """SIGTERM to ``simpleslicenet bids ... --workers 2`` ends its worker processes too, leaving no staging folder."""
    import psutil

    out = tmp_path / "derivatives"
    parent = subprocess.Popen(
        [sys.executable, "-m", "simpleslicenet.cli", "bids", str(bids_app["root"]), str(out), "participant",
         "--model", str(bids_app["xml"]), "--workers", "2", "--no-progress"],  # fmt: skip
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        children: list[psutil.Process] = []
        while len(children) < 2 and time.monotonic() < deadline and parent.poll() is None:
            time.sleep(0.2)
            children = children_running(parent.pid, "simpleslicenet.bids.worker")
        assert len(children) == 2, "the run started no workers"
        time.sleep(1.0)  # while they load the model, each with a subject waiting on its input
        parent.send_signal(signal.SIGTERM)
        status = parent.wait(timeout=60)
        # The parent ends only once its workers have: an orphan would still be loading or on its subject.
        _, alive = psutil.wait_procs(children, timeout=1)
        for child in alive:
            child.kill()
        assert not alive, f"left running: {[child.pid for child in alive]}"
        assert status == 128 + signal.SIGTERM
        assert not [p for p in out.parent.rglob("*") if p.name.startswith(TEMP_PREFIX)]
        for map_file in out.glob("sub-*/**/anat/*_desc-anomaly_T2w.nii.gz"):  # a subject is whole or absent
            assert map_file.with_name(map_file.name.replace(".nii.gz", ".json")).is_file()
    finally:
        if parent.poll() is None:
            parent.kill()


def test_maps_of_preprocessed_scans_are_named_in_their_space(bids_app: dict, tmp_path: Path) -> None:
    root = tmp_path / "bids"
    shutil.copytree(bids_app["root"], root, ignore=shutil.ignore_patterns("derivatives"))
    space = "MNI152NLin2009aAsym"
    preprocessed = root / "derivatives" / "preprocessed" / "sub-08" / "anat"
    preprocessed.mkdir(parents=True)
    shutil.copy(root / "sub-08" / "anat" / "sub-08_T2w.nii.gz", preprocessed / f"sub-08_space-{space}_desc-preproc_T2w.nii.gz")
    out = tmp_path / "derivatives-out"
    _main("bids", root, out, "participant", "--model", bids_app["xml"], "--derivatives", "preprocessed",
          "--participant-label", "08", "--no-progress", "--no-reports")  # fmt: skip
    sidecar = out / "sub-08" / "anat" / f"sub-08_space-{space}_desc-anomaly_T2w.json"
    content = json.loads(sidecar.read_text())
    assert content[RECORD_KEY]["space"] == space and content["SkullStripped"] is True
    assert content[RECORD_KEY]["source"] == "sub-08/anat/sub-08_T2w.nii.gz"


def test_a_report_outlines_the_true_lesion_where_the_dataset_has_one(bids_app: dict) -> None:
    from simpleslicenet.data.bids import BidsDataset

    lesions = {scan.name for scan in BidsDataset(bids_app["root"]).scans() if scan.mask_path is not None}
    records = _records(bids_app["out"])
    assert set(records) & lesions and set(records) - lesions  # patients with a mask, controls without
    for name, record in records.items():
        page = (bids_app["out"] / record["files"]["report"]).read_text()
        assert ("Green: the true lesion." in page) == (name in lesions), name


def test_participant_level_on_ray_writes_what_the_local_run_writes(bids_app: dict, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """``--executor ray`` on a one-CPU local Ray: the command line (outputs shared), and as on a cluster whose
    nodes do not share the output folder (each subject's files shipped back); both as the local run wrote."""
    ray = pytest.importorskip("ray")
    from simpleslicenet.executors import ExecutorSettings

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    shared, shipped = tmp_path / "shared", tmp_path / "shipped"
    try:
        _main("bids", bids_app["root"], shared, "participant", "--model", bids_app["xml"], "--calibration",
              bids_app["calibration"], "--fdr", FDR, "--participant-label", "07", "08", "--executor", "ray",
              "--no-progress")  # fmt: skip
        options = ParticipantOptions(str(bids_app["xml"]), calibration=str(bids_app["calibration"]), fdr=float(FDR))
        on_cluster = ExecutorSettings("ray", num_cpus=1, shared_output=False)
        report = run_participant(bids_app["root"], shipped, options, participants=["07", "08"], progress=False,
                                 executor=on_cluster)  # fmt: skip
    finally:
        ray.shutdown()
        for sig, handler in handlers.items():  # ray.init replaced them; later tests rely on the defaults
            signal.signal(sig, handler)
    assert sorted(report.done) == ["sub-07_ses-01_T2w", "sub-07_ses-02_T2w", "sub-08_T2w"] and report.ok

    local = bids_app["out"]
    expected = {p.relative_to(local) for p in local.glob("sub-0[78]/**/*") if p.is_file()}
    local_records = _records(local)
    for out in (shared, shipped):
        assert {p.relative_to(out) for p in out.glob("sub-*/**/*") if p.is_file()} == expected
        assert not [p for p in out.rglob("*") if p.name.startswith(TEMP_PREFIX)]
        records = _records(out)
        assert set(records) == {"sub-07_ses-01_T2w", "sub-07_ses-02_T2w", "sub-08_T2w"}
        for name, record in records.items():
            for key in ("volume_score", "volume_pvalue", "slice_scores", "clusters"):
                assert record[key] == local_records[name][key], (out.name, name, key)
            ours = nib.load(out / record["files"]["map"]).get_fdata()
            np.testing.assert_array_equal(ours, nib.load(local / record["files"]["map"]).get_fdata())
        manifest = json.loads((out / "simpleslicenet_manifest.json").read_text())
        assert "sub-08_T2w" in json.dumps(manifest)  # the parent kept the manifest
