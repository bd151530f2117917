"""Trustworthy model files and outputs: no code runs from a checkpoint, metadata is validated, and
``predict`` writes one complete batch or nothing, even when it is killed half-way."""

from __future__ import annotations

import gc
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import PHANTOM_KWARGS

from simpleslicenet.atomic import TEMP_PREFIX
from simpleslicenet.data.geometry import to_slices
from simpleslicenet.data.nifti import VolumeError
from simpleslicenet.data.volume import VolumePreprocessing, load_volume
from simpleslicenet.deploy import predict as predict_module
from simpleslicenet.deploy.inferencer import VolumeInferencer, VolumePrediction
from simpleslicenet.deploy.loading import (
    ModelFileError,
    ModelOutputError,
    accept_package_class,
    read_checkpoint,
    resolve_model_class,
)
from simpleslicenet.deploy.predict import predict_paths
from simpleslicenet.model_metadata import parse_metadata, parse_metadata_json

BIN = Path(sys.executable).parent
SHAPE = (24, 28, 16)
GRID = (16, 16, 8)
CLASS_PATH = "simpleslicenet.models.simpleslicenet.lightning_model.SimpleSliceNet"


def metadata(**changes: object) -> dict:
    """A valid metadata block, as a trained model writes it, with ``changes`` applied."""
    record = {
        "class_path": CLASS_PATH,
        "preprocessing": VolumePreprocessing(target_shape=GRID, spacing_mm=2.0, modality="t2").to_dict(),
        "scoring": {"volume_score_mode": "max", "topk_fraction": 0.001, "map_reference": "brain_median", "smoothing_sigma": 2.0},
        "dice_threshold": 0.5,
    }
    record.update(changes)
    return record


def brain(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij"))
    inside = (grid**2).sum(0) < 0.7
    return np.where(inside, 300 + rng.integers(0, 100, SHAPE), 0).astype(np.int16)


def write_scans(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"scan{index}.nii.gz"
        nib.save(nib.Nifti1Image(brain(index), np.diag([2.0, 2.0, 2.0, 1.0])), path)
        paths.append(path)
    return paths


# --- malicious checkpoints ----------------------------------------------------------------------


class _Payload:
    """Pickles as a call that writes ``marker``: what a crafted checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (exec, (f"open({self.marker!r}, 'w').write('code from the checkpoint ran')",))


@pytest.fixture
def evil_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    """A checkpoint with valid metadata and a payload that creates a marker file when unpickled."""
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "simpleslicenet": metadata(), "payload": _Payload(marker)}, path)
    assert not marker.exists()
    return path, marker


def test_malicious_checkpoint_is_refused_by_the_inferencer(evil_checkpoint: tuple) -> None:
    path, marker = evil_checkpoint
    with pytest.raises(ModelFileError, match="would run code stored in it") as info:
        VolumeInferencer(path, device="cpu")
    message = str(info.value)
    assert str(path) in message and "builtins.exec" in message and "TRUST_REMOTE_CODE=1" in message
    assert not marker.exists()


def test_malicious_checkpoint_is_refused_by_the_predict_command(evil_checkpoint: tuple, tmp_path: Path) -> None:
    from simpleslicenet.cli import main

    path, marker = evil_checkpoint
    scans = tmp_path / "scans"
    write_scans(scans, 1)
    with pytest.raises(SystemExit, match=r"evil\.ckpt: refused: loading this checkpoint would run code"):
        main(["predict", "--model", str(path), "--input", str(scans), "--output", str(tmp_path / "maps")])
    assert not marker.exists()
    assert not (tmp_path / "maps").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TEMP_PREFIX)]


def test_code_runs_only_when_the_user_opts_in(evil_checkpoint: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    path, marker = evil_checkpoint
    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")  # anomalib's own opt-in convention
    loaded = read_checkpoint(path)
    assert marker.exists() and loaded.ran_code


@pytest.mark.slow
def test_malicious_checkpoint_is_refused_by_anomalib_predict(evil_checkpoint: tuple, phantom_root: Path) -> None:
    path, marker = evil_checkpoint
    data = ["--data", "BrainPhantom", "--data.root", str(phantom_root), "--data.target_shape", "[32, 32, 16]",
            "--data.progress", "false"]  # fmt: skip
    for key, value in PHANTOM_KWARGS.items():
        data += [f"--data.{key}", str(value)]
    completed = subprocess.run(
        [str(BIN / "anomalib"), "predict", "--model", "SimpleSliceNet", *data, "--ckpt_path", str(path),
         "--default_root_dir", str(path.parent / "results")],
        cwd=path.parent, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    output = completed.stdout + completed.stderr
    assert completed.returncode != 0
    assert str(path) in output and "Weights only load failed" in output
    assert not marker.exists()


def test_class_path_outside_the_registry_is_never_imported(tmp_path: Path) -> None:
    assert "this" not in sys.modules  # the standard library's easter egg prints when imported
    path = tmp_path / "foreign_class.ckpt"
    torch.save({"state_dict": {}, "simpleslicenet": metadata(class_path="this.Anything")}, path)
    with pytest.raises(
        ModelFileError, match=r"model class 'this\.Anything' is not one of the package's models"
    ) as info:
        VolumeInferencer(path, device="cpu")
    assert str(path) in str(info.value)
    assert "this" not in sys.modules


@pytest.mark.parametrize(
    "class_path",
    [
        "os.system",
        "subprocess.Popen",
        "simpleslicenet.models.registry.create_model",
        "simpleslicenet.models.slicewise.os",
    ],
)
def test_only_registered_model_classes_are_accepted(class_path: str) -> None:
    with pytest.raises(ModelFileError, match="is not one of the package's models"):
        resolve_model_class(class_path, "model.ckpt")


def test_registered_and_slicewise_classes_resolve() -> None:
    assert resolve_model_class(CLASS_PATH, "model.ckpt").__name__ == "SimpleSliceNet"
    assert resolve_model_class("simpleslicenet.models.slicewise.padim.PadimSlices", "m").__name__ == "PadimSlices"
    assert resolve_model_class("simpleslicenet.models.slicewise.StfpmSlices", "m").__name__ == "StfpmSlices"
    with pytest.raises(ModelFileError, match="NoSuchModelSlices"):
        resolve_model_class("simpleslicenet.models.slicewise.NoSuchModelSlices", "m")


@pytest.mark.slow
def test_own_checkpoint_loads_without_code_and_predicts(
    trained_simpleslicenet,  # noqa: ANN001
    phantom_root: Path,
    tmp_path: Path,
) -> None:
    _, _, checkpoint = trained_simpleslicenet
    assert not read_checkpoint(checkpoint).ran_code
    inferencer = VolumeInferencer(checkpoint, device="cpu")
    assert inferencer.metadata["class_path"].endswith("SimpleSliceNet")
    scan = min(phantom_root.glob("Phantom_*/*_t2.nii.gz"))
    prediction = inferencer.predict(scan)
    assert np.isfinite(prediction.anomaly_map).all() and np.isfinite(prediction.volume_score)


# --- metadata -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{not json", "not valid JSON"),
        ('{"class_path": NaN}', "not valid JSON"),
        (json.dumps(metadata()).replace("0.5", "1e999"), "not valid JSON"),
        ("[1, 2]", "expected a mapping, got list"),
        (json.dumps(metadata(version=2)), r"unknown keys \['version'\]"),
        (json.dumps(metadata(class_path=7)), "model class 7 is not one of the package's models"),
        (json.dumps(metadata(dice_threshold="high")), "dice_threshold must be a finite number"),
        (json.dumps(metadata(dice_threshold=True)), "dice_threshold must be a finite number"),
        (json.dumps(metadata(preprocessing=[1, 2])), "preprocessing must be a mapping"),
        (
            json.dumps(metadata(preprocessing={"target_shape": [100000, 100000, 100000]})),
            "model grid of .* exceeds the limit",
        ),
        (json.dumps(metadata(preprocessing={"target_shape": ["a", 2, 3]})), "target_shape must be three whole numbers"),
        (json.dumps(metadata(preprocessing={"spacing_mm": -1})), "spacing_mm must be a positive finite number"),
        (json.dumps(metadata(preprocessing={"colour": "red"})), "unknown keys"),
        (json.dumps(metadata(scoring={"volume_score_mode": "median"})), "invalid simpleslicenet metadata .*volume_score_mode"),
        (json.dumps(metadata(scoring={"topk_fraction": [1]})), "invalid simpleslicenet metadata"),
        (json.dumps(metadata(scoring={"map_reference": "peak"})), "invalid simpleslicenet metadata .*map_reference"),
        ("x" * 70_000, "characters; ours are far shorter"),
    ],
)
def test_invalid_metadata_gives_the_package_error(text: str, problem: str) -> None:
    with pytest.raises(ModelFileError, match=problem) as info:
        parse_metadata_json(text, "exported/model.xml", accept_package_class)
    assert "exported/model.xml" in str(info.value)


def test_valid_metadata_round_trips() -> None:
    parsed = parse_metadata(metadata(), "model.ckpt", accept_package_class)
    assert parsed.to_dict() == metadata()
    assert json.loads(parsed.to_json()) == metadata()
    assert parsed.preprocessing.target_shape == GRID and parsed.dice_threshold == 0.5
    # Scoring settings a block leaves out take VolumeScoring's defaults: no centring, no smoothing.
    older = parse_metadata(metadata(scoring={"volume_score_mode": "max", "topk_fraction": 0.001}), "model.ckpt")
    assert older.scoring.map_reference == "none"
    assert older.scoring.smoothing_sigma == 0.0


def test_metadata_schema_without_a_class_rule_still_checks_the_block() -> None:
    # Restoring a checkpoint validates the block with the same schema; only the class rule is left out.
    assert parse_metadata(metadata(class_path="my.own.Model"), "model.ckpt").class_path == "my.own.Model"
    with pytest.raises(ModelFileError, match="class_path must be the model class's path, got 7"):
        parse_metadata(metadata(class_path=7), "model.ckpt")
    with pytest.raises(ModelFileError, match="dice_threshold must be a finite number"):
        parse_metadata(metadata(dice_threshold=float("nan")), "model.ckpt")
    with pytest.raises(ModelFileError, match="is not one of the package's models"):
        parse_metadata(metadata(class_path="my.own.Model"), "model.ckpt", accept_package_class)


# --- exported graphs ----------------------------------------------------------------------------


class _NaNMap(torch.nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=1) * float("nan")


def _export_graph(path: Path, module: torch.nn.Module, rt_info: str | None, dynamic: bool = True) -> Path:
    import openvino as ov

    shape = [-1 if dynamic else 2, 3, GRID[1], GRID[0]]
    graph = ov.convert_model(module, example_input=torch.zeros(2, 3, GRID[1], GRID[0]), input=[ov.PartialShape(shape)])
    graph.outputs[0].get_tensor().set_names({"anomaly_map"})
    if rt_info is not None:
        graph.set_rt_info(rt_info, ["simpleslicenet"])
    ov.save_model(graph, path)
    return path


def test_foreign_graph_with_copied_metadata_fails_its_scans(tmp_path: Path) -> None:
    xml = _export_graph(tmp_path / "nan.xml", _NaNMap(), json.dumps(metadata()))
    scans = tmp_path / "scans"
    write_scans(scans, 2)
    inferencer = VolumeInferencer(xml)
    with pytest.raises(ModelOutputError, match=r"nan\.xml: model gave .* NaN or infinite scores"):
        inferencer.run_slices(np.zeros((GRID[2], 3, GRID[1], GRID[0]), np.float32))
    report = predict_paths(xml, scans, tmp_path / "maps", progress=False)
    assert not report.ok and len(report.failed) == 2 and not report.scans
    text = (tmp_path / "maps" / "scores.json").read_text()
    scores = json.loads(text, parse_constant=lambda name: pytest.fail(f"scores.json holds {name}"))
    assert [Path(f["scan"]).name for f in scores["failed"]] == ["scan0.nii.gz", "scan1.nii.gz"]
    assert "NaN or infinite scores" in scores["failed"][0]["error"]


@pytest.mark.parametrize(
    ("rt_info", "dynamic", "problem"),
    [
        ("{broken", True, "not valid JSON"),
        (json.dumps(metadata(class_path="builtins.eval")), True, "is not one of the package's models"),
        (json.dumps(metadata()), False, "dynamic number of slices"),
        (None, True, "no 'simpleslicenet' metadata"),
    ],
)
def test_broken_exports_give_the_package_error(
    tmp_path: Path, rt_info: str | None, dynamic: bool, problem: str
) -> None:
    xml = _export_graph(tmp_path / "model.xml", _NaNMap(), rt_info, dynamic=dynamic)
    with pytest.raises(ModelFileError, match=problem) as info:
        VolumeInferencer(xml)
    assert str(xml) in str(info.value)


def test_unreadable_graph_gives_the_package_error(tmp_path: Path) -> None:
    xml = tmp_path / "model.xml"
    xml.write_text("<net><layers><layer id='0' type='Parameter'>")
    with pytest.raises(ModelFileError, match="not a readable OpenVINO model") as info:
        VolumeInferencer(xml)
    assert str(xml) in str(info.value)


def test_models_released_in_loading_order_leave_signal_handlers_working(tmp_path: Path) -> None:
    """Ctrl-C and SIGTERM still reach their Python handlers after two models were loaded and released, first in, first out."""
    xml = _export_graph(tmp_path / "model.xml", _NaNMap(), json.dumps(metadata()))
    first, second = VolumeInferencer(xml), VolumeInferencer(xml)
    del first, second
    gc.collect()
    pid = os.fork()
    if pid == 0:  # the handler runs on the thread's alternate signal stack: it must still be there
        handled = []
        signal.signal(signal.SIGTERM, lambda *_: handled.append(True))
        signal.raise_signal(signal.SIGTERM)
        os._exit(0 if handled else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"the child ended with wait status {status}"


# Fresh interpreters: OpenVINO's Python layer builds its element-type table once per process, on first use.
_FIRST_USE_RACE = """
import sys, threading
sys.setswitchinterval(1e-6)
import openvino as ov
from simpleslicenet.deploy.openvino import openvino_core
openvino_core()
barrier = threading.Barrier(32)
def convert():
    barrier.wait()
    ov.Type.f32.to_dtype()  # what every inference does with its input first
threads = [threading.Thread(target=convert) for _ in range(32)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print("done")
"""


def test_threads_that_run_their_first_inference_together_do_not_deadlock() -> None:
    """Scans in flight start their first inference together; the package builds OpenVINO's type table before.

    Left to the threads, the table's C++ initialiser gives up the GIL inside and a second thread blocks on
    it holding the GIL: `predict` hung. Without the package's set-up this child hangs in most runs.
    """
    for _ in range(3):
        child = subprocess.run([sys.executable, "-c", _FIRST_USE_RACE], capture_output=True, text=True, timeout=120, check=False)
        assert child.returncode == 0 and "done" in child.stdout, child.stderr[-2000:]


# --- predict: one transaction per batch ---------------------------------------------------------


class StubInferencer:
    """Stands in for a model: reads scans through the real path, its 'map' is the scan itself."""

    delay_s = 0.0
    volume_score: float | None = None
    concurrent = False

    def __init__(self, model: object, device: str = "CPU", precision: str = "f32", streams: int = 1) -> None:
        del device, precision
        # The scans predict asks to run at once, as an export runs them, or one at a time, as a checkpoint does.
        self.streams = streams if self.concurrent else 1
        if "broken" in str(model):
            msg = f"{model}: not a readable OpenVINO model"
            raise ModelFileError(msg)
        self.preprocessing = VolumePreprocessing(target_shape=GRID)
        self.metadata = {"dice_threshold": 0.5}

    def predict(self, scan_path: Path, brain_mask_path: Path | None = None) -> VolumePrediction:
        volume = load_volume(scan_path, self.preprocessing, brain_mask_path=brain_mask_path)
        model_map = to_slices(volume.image)
        time.sleep(self.delay_s)
        score = float(model_map.max()) if self.volume_score is None else self.volume_score
        return VolumePrediction(
            anomaly_map=volume.geometry.to_scan(model_map),
            scan_brain_mask=volume.geometry.to_scan(to_slices(volume.brain_mask), fill=False),
            model_map=model_map,
            slice_scores=model_map.reshape(len(model_map), -1).max(axis=1),
            volume_score=score,
            geometry=volume.geometry,
            brain_mask=to_slices(volume.brain_mask),
        )


@pytest.fixture(params=[False, True], ids=["one scan at a time", "scans in flight"])
def stub(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> type[StubInferencer]:
    monkeypatch.setattr(predict_module, "VolumeInferencer", StubInferencer)
    monkeypatch.setattr(StubInferencer, "delay_s", 0.0)
    monkeypatch.setattr(StubInferencer, "concurrent", request.param)
    return StubInferencer


def _temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(TEMP_PREFIX)]


def _check_complete_batch(output: Path) -> set[str]:
    """Every file under ``output`` loads, and the maps are exactly those ``scores.json`` lists."""
    assert not _temporaries(output)
    scores = json.loads((output / "scores.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    listed = {Path(record["map_path"]).name for record in scores["scans"]}
    listed |= {Path(record["mask_path"]).name for record in scores["scans"] if "mask_path" in record}
    maps = set()
    for path in output.iterdir():
        if path.name.endswith(".nii.gz"):
            assert np.isfinite(nib.load(path).get_fdata()).all()
            maps.add(path.name)
    assert maps == listed
    assert (output / "scores.csv").read_text().startswith("rank,scan,volume_pvalue,volume_score")
    return maps


def test_bad_scan_is_skipped_listed_and_fails_the_command(stub: type, tmp_path: Path) -> None:
    from simpleslicenet.cli import main

    scans = tmp_path / "scans"
    write_scans(scans, 3)
    whole = (scans / "scan1.nii.gz").read_bytes()
    (scans / "scan1.nii.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(SystemExit, match=r"1 of 3 scans failed and were skipped"):
        main(["predict", "--model", "m.xml", "--input", str(scans), "--output", str(tmp_path / "maps")])
    assert _check_complete_batch(tmp_path / "maps") == {"scan0_anomaly_map.nii.gz", "scan2_anomaly_map.nii.gz"}
    scores = json.loads((tmp_path / "maps" / "scores.json").read_text())
    assert [Path(f["scan"]).name for f in scores["failed"]] == ["scan1.nii.gz"]
    assert "truncated or corrupt" in scores["failed"][0]["error"]


def test_fail_fast_stops_and_writes_nothing(stub: type, tmp_path: Path) -> None:
    scans = tmp_path / "scans"
    write_scans(scans, 3)
    (scans / "scan1.nii.gz").write_bytes(b"not a scan")
    with pytest.raises(VolumeError, match=r"scan1\.nii\.gz: not a readable NIfTI file"):
        predict_paths("m.xml", scans, tmp_path / "maps", progress=False, fail_fast=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scans"]  # no output, no staging folder


def test_overwrite_replaces_the_whole_batch_and_a_failed_batch_changes_nothing(stub: type, tmp_path: Path) -> None:
    scans = tmp_path / "scans"
    write_scans(scans, 3)
    out = tmp_path / "maps"
    predict_paths("m.xml", scans, out, threshold=0.5, progress=False)
    assert len(_check_complete_batch(out)) == 6  # a map and a mask per scan
    (scans / "scan2.nii.gz").unlink()
    predict_paths("m.xml", scans, out, overwrite=True, progress=False)
    assert _check_complete_batch(out) == {"scan0_anomaly_map.nii.gz", "scan1_anomaly_map.nii.gz"}  # no stale files
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    stub.volume_score = float("nan")  # a NaN would make invalid JSON: the batch fails instead
    try:
        with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
            predict_paths("m.xml", scans, out, overwrite=True, progress=False)
    finally:
        stub.volume_score = None
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TEMP_PREFIX)]


def test_output_folder_with_other_files_is_refused(stub: type, tmp_path: Path) -> None:
    scans = tmp_path / "scans"
    write_scans(scans, 1)
    with pytest.raises(FileExistsError, match="entries that predict did not write"):
        predict_paths("m.xml", scans, scans, progress=False)  # the input folder itself
    out = tmp_path / "maps"
    predict_paths("m.xml", scans, out, progress=False)
    with pytest.raises(FileExistsError, match="already exists .* pass --overwrite"):
        predict_paths("m.xml", scans, out, progress=False)


def test_killed_batches_leave_one_complete_batch_and_no_temporary_files(stub: type, tmp_path: Path) -> None:
    scans = tmp_path / "scans"
    write_scans(scans, 5)
    out = tmp_path / "maps"
    predict_paths("m.xml", scans, out, progress=False)
    first = _check_complete_batch(out)
    stub.delay_s = 0.04
    start = time.perf_counter()
    predict_paths("m.xml", scans, out, overwrite=True, progress=False)
    batch_s = time.perf_counter() - start
    # Kill points spread over the whole batch and a little past it (some batches finish), in random order.
    rng = random.Random(0)
    trials = 12
    delays = [(index + rng.random()) / trials * 1.5 * batch_s for index in range(trials)]
    rng.shuffle(delays)
    interrupted = 0
    for trial, delay in enumerate(delays):
        kill = signal.SIGKILL if trial % 2 else signal.SIGTERM
        pid = os.fork()
        if pid == 0:  # the child runs one batch; it is killed somewhere inside it, or finishes
            code = 0
            try:
                predict_paths("m.xml", scans, out, overwrite=True, progress=False)
            except BaseException:  # noqa: BLE001 - the exit status is all the parent looks at
                code = 3
            os._exit(code)
        time.sleep(delay)
        os.kill(pid, kill)
        _, status = os.waitpid(pid, 0)
        interrupted += os.WIFSIGNALED(status) or os.WEXITSTATUS(status) != 0
        assert _check_complete_batch(out) == first
        if kill == signal.SIGTERM:  # its cleanup ran: nothing of this run is left beside the output
            assert not [p for p in tmp_path.iterdir() if p.name.startswith(TEMP_PREFIX) and re.search(rf"[.-]{pid}-", p.name)]
    assert interrupted >= 3  # the early kill points cannot all have missed the batch
    predict_paths("m.xml", scans, out, overwrite=True, progress=False)  # removes what killed runs left
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TEMP_PREFIX)]


def test_a_process_killed_holding_the_progress_lock_does_not_block_a_quiet_batch(stub: type, tmp_path: Path) -> None:
    """tqdm's class lock is shared with forked processes: a batch without a bar must not wait for it."""
    import multiprocessing

    from tqdm.auto import tqdm  # the class predict uses (its lock is its own once it has shown a bar)

    scans = tmp_path / "scans"
    write_scans(scans, 2)
    pid = os.fork()
    if pid == 0:  # in a child with a process-shared lock of its own: the one it leaves held is not the session's
        tqdm.set_lock(multiprocessing.RLock())
        taken, told = os.pipe()
        holder = os.fork()
        if holder == 0:
            if tqdm.get_lock().acquire(timeout=30):  # bounded, so that no process of this test outlives it
                os.write(told, b"1")
            time.sleep(60)
            os._exit(0)
        os.read(taken, 1)
        os.kill(holder, signal.SIGKILL)  # dies holding the lock
        os.waitpid(holder, 0)
        code = 0
        try:
            predict_paths("m.xml", scans, tmp_path / "maps", progress=False)
        except BaseException:  # noqa: BLE001 - the exit status is all the parent looks at
            code = 3
        os._exit(code)
    deadline = time.monotonic() + 60
    while (ended := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if ended[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the batch waited for a lock held by a killed process")
    assert os.WIFEXITED(ended[1]) and os.WEXITSTATUS(ended[1]) == 0, f"the child ended with wait status {ended[1]}"
    assert len(_check_complete_batch(tmp_path / "maps")) == 2


# --- one writer of a scan's outputs -------------------------------------------------------------


def test_scan_outputs_are_named_in_one_place_and_never_read_as_scans(tmp_path: Path) -> None:
    from simpleslicenet.calibration import ConformalCalibration
    from simpleslicenet.data.scans import OUTPUT_SUFFIXES, scans_from
    from simpleslicenet.scan_outputs import OUTPUT_FILES, ScanOutputs, output_paths, threshold_mask, write_scan_outputs

    assert {suffix.removesuffix(".nii.gz") for suffix in OUTPUT_FILES.values() if suffix.endswith(".nii.gz")} == set(
        OUTPUT_SUFFIXES
    )
    (scan,) = write_scans(tmp_path / "scans", 1)
    volume = load_volume(scan, VolumePreprocessing(target_shape=GRID))
    model_map, brain = to_slices(volume.image), to_slices(volume.brain_mask).astype(bool)
    calibration = ConformalCalibration.from_scores([model_map[brain] * 0.5], [0.4])
    outputs = ScanOutputs(
        name="scan0",
        geometry=volume.geometry,
        model_map=model_map,
        mask=threshold_mask(model_map, float(np.median(model_map[brain])), brain),
        pvalues=calibration.pvalue_map(model_map, brain),
        image=model_map,
        brain=brain,
    )
    written = write_scan_outputs(outputs, tmp_path / "scans", preview=True)
    assert written == output_paths(tmp_path / "scans", outputs, preview=True)
    assert sorted(path.name for path in written.values()) == sorted(f"scan0{suffix}" for suffix in OUTPUT_FILES.values())
    for key in ("map", "pvalue_map", "mask"):
        image = nib.load(written[key])
        assert image.shape == SHAPE and np.allclose(image.affine, np.diag([2.0, 2.0, 2.0, 1.0]))
    mask = np.asarray(nib.load(written["mask"]).dataobj)
    assert mask.dtype == np.uint8 and 0 < mask.sum() < np.asarray(volume.brain_mask).sum()
    pvalues = np.asarray(nib.load(written["pvalue_map"]).dataobj)
    assert pvalues.min() > 0 and pvalues.max() == 1.0  # 1 outside the brain
    # The outputs lie beside the scan, yet the folder still holds one scan.
    assert [found.image_path.name for found in scans_from(tmp_path / "scans")] == ["scan0.nii.gz"]
    with pytest.raises(FileExistsError):
        write_scan_outputs(outputs, tmp_path / "scans")
