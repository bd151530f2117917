"""The stock ``anomalib`` command with short names, OpenVINO export, and CPU deployment of the exported model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import PHANTOM_KWARGS

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    completed = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=900, check=False)
    assert completed.returncode == 0, f"{' '.join(args)}\n{completed.stdout[-2000:]}\n{completed.stderr[-4000:]}"
    return completed


def _data_args(phantom_root: Path) -> list[str]:
    args = ["--data", "BrainPhantom", "--data.root", str(phantom_root), "--data.target_shape", "[32, 32, 16]",
            "--data.progress", "false"]
    for key, value in PHANTOM_KWARGS.items():
        args += [f"--data.{key}", str(value)]
    return args


MODEL_ARGS = ["--model.flow_blocks", "2", "--model.smoothing_sigma", "1.0"]


@pytest.fixture(scope="module")
def cli_run(phantom_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``anomalib train --model SimpleSliceNet --data BrainPhantom`` then ``anomalib export`` to OpenVINO."""
    work = tmp_path_factory.mktemp("cli")
    train = _run(
        [str(BIN / "anomalib"), "train", "--model", "SimpleSliceNet", *MODEL_ARGS, *_data_args(phantom_root),
         "--trainer.max_epochs", "1", "--seed_everything", "0", "--default_root_dir", str(work / "results")],
        cwd=work,
    )
    checkpoint = next((work / "results").rglob("model.ckpt"))
    export = _run(
        [str(BIN / "anomalib"), "export", "--model", "SimpleSliceNet", "--export_type", "openvino",
         "--ckpt_path", str(checkpoint), "--default_root_dir", str(work / "export")],
        cwd=work,
    )
    xml = next((work / "export").rglob("model.xml"))
    return {"work": work, "train": train, "checkpoint": checkpoint, "xml": xml, "export": export}


def test_stock_cli_seed_gives_the_same_model_twice(cli_run: dict, phantom_root: Path, tmp_path: Path) -> None:
    """anomalib's own CLI accepts --seed_everything but does not seed; with the package installed it does.

    The second run goes through the package's own command and the model's dotted class path, which must
    reach the same model as ``anomalib train`` with the short name.
    """
    completed = _run(
        [str(BIN / "simpleslicenet"), "fit", "--model", "simpleslicenet.models.simpleslicenet.SimpleSliceNet",
         *MODEL_ARGS, *_data_args(phantom_root), "--trainer.max_epochs", "1", "--seed_everything", "0",
         "--default_root_dir", str(tmp_path)],
        cwd=tmp_path,
    )
    weights = []
    for output, checkpoint in ((cli_run["train"], cli_run["checkpoint"]), (completed, next(tmp_path.rglob("model.ckpt")))):
        assert "Seed set to 0" in output.stdout + output.stderr
        weights.append(torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"])
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:  # NaN equals NaN here: unused post-processor thresholds stay NaN
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=0, atol=0, equal_nan=True, msg=key)


def test_stock_train_with_short_names_prints_metrics_and_writes_maps(cli_run: dict) -> None:
    output = cli_run["train"].stdout + cli_run["train"].stderr
    for name in ("voxel_AUPRC", "slice_AUROC", "volume_AUROC"):
        assert name in output
    maps = list((cli_run["work"] / "results").rglob("*_anomaly_map.nii.gz"))
    assert maps
    # The test-time writer writes what predict writes for a scan, under the same names: the validation
    # threshold's mask and the preview beside each map.
    for path in maps:
        stem = path.name.removesuffix("_anomaly_map.nii.gz")
        assert (path.parent / f"{stem}_anomaly_mask.nii.gz").is_file()
        assert (path.parent / f"{stem}_preview.png").stat().st_size > 0


def test_stock_test_and_predict_with_short_names(cli_run: dict, phantom_root: Path) -> None:
    work = cli_run["work"]
    tested = _run(
        [str(BIN / "anomalib"), "test", "--model", "SimpleSliceNet", *MODEL_ARGS, *_data_args(phantom_root),
         "--ckpt_path", str(cli_run["checkpoint"]), "--default_root_dir", str(work / "test")],
        cwd=work,
    )
    assert "voxel_AUROC" in tested.stdout + tested.stderr
    _run(
        [str(BIN / "anomalib"), "predict", "--model", "SimpleSliceNet", *MODEL_ARGS, *_data_args(phantom_root),
         "--ckpt_path", str(cli_run["checkpoint"]), "--default_root_dir", str(work / "predict")],
        cwd=work,
    )
    assert list((work / "predict").rglob("*_anomaly_map.nii.gz"))


def test_export_has_dynamic_slices_and_metadata(cli_run: dict) -> None:
    import openvino as ov

    model = ov.Core().read_model(cli_run["xml"])
    shape = model.inputs[0].get_partial_shape()
    assert shape[0].is_dynamic and shape[1].get_length() == 3
    meta = json.loads(model.get_rt_info(["simpleslicenet"]).astype(str))
    assert meta["class_path"].endswith("SimpleSliceNet")
    assert meta["preprocessing"]["target_shape"] == [32, 32, 16]


def test_openvino_matches_torch(cli_run: dict) -> None:
    from simpleslicenet.deploy import VolumeInferencer

    openvino = VolumeInferencer(cli_run["xml"])
    eager = VolumeInferencer(cli_run["checkpoint"], device="cpu")
    generator = torch.Generator().manual_seed(0)
    for depth in (16, 11):  # the number of slices is free
        slices = torch.rand(depth, 3, 32, 32, generator=generator).numpy()
        ov_map, pt_map = openvino.run_slices(slices).numpy(), eager.run_slices(slices).numpy()
        assert ov_map.shape == (depth, 32, 32)
        np.testing.assert_allclose(ov_map, pt_map, rtol=1e-4, atol=1e-4 * np.abs(pt_map).max())


def test_predict_command_writes_maps_in_scan_space(cli_run: dict, phantom_root: Path, tmp_path: Path) -> None:
    scans = tmp_path / "scans"
    scans.mkdir()
    originals = sorted(phantom_root.glob("Phantom_*/*_t2.nii.gz"))[-2:]
    for scan in originals:
        (scans / scan.name).symlink_to(scan)
    out = tmp_path / "out"
    args = [str(BIN / "simpleslicenet"), "predict", "--model", str(cli_run["xml"]), "--input", str(scans),
            "--output", str(out), "--threshold", "val", "--previews"]
    _run(args, cwd=tmp_path)
    for scan in originals:
        stem = scan.name[: -len(".nii.gz")]
        written = nib.load(out / f"{stem}_anomaly_map.nii.gz")
        source = nib.load(scan)
        assert written.shape == source.shape
        np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)
        mask = nib.load(out / f"{stem}_anomaly_mask.nii.gz")
        assert mask.shape == source.shape and mask.get_data_dtype() == np.uint8
        assert (out / f"{stem}_preview.png").stat().st_size > 0
    scores = json.loads((out / "scores.json").read_text())
    # The mask threshold is the one chosen on the validation split during training, kept in the export.
    import openvino as ov

    metadata = json.loads(ov.Core().read_model(cli_run["xml"]).get_rt_info(["simpleslicenet"]).astype(str))
    assert scores["threshold"] == pytest.approx(metadata["dice_threshold"])
    assert len(scores["scans"]) == 2 and all(len(s["slice_scores"]) == 16 for s in scores["scans"])

    # Existing outputs are never overwritten unless asked, and are left untouched.
    before = (out / "scores.json").read_bytes()
    refused = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert refused.returncode != 0 and "already exists" in refused.stderr
    assert (out / "scores.json").read_bytes() == before
    _run([*args, "--overwrite"], cwd=tmp_path)


def test_foreign_model_files_are_refused(tmp_path: Path) -> None:
    import openvino as ov

    from simpleslicenet.deploy import ModelFileError, VolumeInferencer

    plain = ov.convert_model(torch.nn.Conv2d(3, 1, 1), example_input=torch.zeros(1, 3, 8, 8))
    ov.save_model(plain, tmp_path / "plain.xml")
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    (tmp_path / "notes.txt").write_text("not a model")
    for path, problem in (
        ("plain.xml", "not an exported simpleslicenet model"),
        ("other.ckpt", "not a simpleslicenet checkpoint"),
        ("notes.txt", "unknown model format"),
        ("missing.xml", "does not exist"),
    ):
        with pytest.raises(ModelFileError, match=problem) as error:
            VolumeInferencer(tmp_path / path)
        assert path in str(error.value)


def test_failed_export_keeps_the_previous_model(cli_run: dict, tmp_path: Path) -> None:
    from simpleslicenet.models.simpleslicenet import SimpleSliceNet

    model = SimpleSliceNet.load_from_checkpoint(cli_run["checkpoint"], weights_only=True)
    target = tmp_path / "weights" / "openvino"
    target.mkdir(parents=True)
    for path in cli_run["xml"].parent.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    with pytest.raises(TypeError, match="no_such_option"):
        model.to_openvino(tmp_path, ov_kwargs={"no_such_option": 1})
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["weights"]  # no staging folder left behind
    assert sorted(p.name for p in (tmp_path / "weights").iterdir()) == ["openvino"]


def test_predict_refuses_the_same_scan_twice(tmp_path: Path) -> None:
    import nibabel as nib

    from simpleslicenet.data.nifti import VolumeError
    from simpleslicenet.deploy import predict_paths

    volume = nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4))
    nib.save(volume, tmp_path / "scan.nii")
    nib.save(volume, tmp_path / "scan.nii.gz")
    with pytest.raises(VolumeError, match=r"scan\.nii\.gz: the same scan twice: scan\.nii and scan\.nii\.gz"):
        predict_paths(tmp_path / "model.xml", tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
