"""One benchmark run in its own process: fit, validate, test through anomalib's Engine, write one JSON.

Run as ``python -m simpleslicenet.benchmark.single_run SPEC.json RESULT.json``. The metrics are the
model's own Evaluator's, exactly as ``anomalib test`` reports them (validation picks the Dice threshold,
test applies it). A process per run keeps runs independent (no allocator or cache carried over) and
makes the process's peak resident memory the run's peak RAM.
"""

from __future__ import annotations

import argparse
import importlib
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from anomalib.deploy import ExportType
from anomalib.engine import Engine
from lightning.pytorch import seed_everything
from lightning.pytorch.loggers import CSVLogger

from simpleslicenet.quiet import quiet_lightning_messages
from simpleslicenet.atomic import atomic_write_text
from simpleslicenet.benchmark.callbacks import ExampleDrawer, InferenceTimer
from simpleslicenet.data import datamodules
from simpleslicenet.metrics.breakdown import MetricBreakdown
from simpleslicenet.metrics.calibrated import CalibratedEvaluation, calibrate_model
from simpleslicenet.models.registry import get_model_class
from simpleslicenet.training.selection import ValidationSliceAUROCCheckpoint

__all__ = ["load_datamodule", "retest_parser", "retest_run", "run_records", "run_single", "write_report"]


def load_datamodule(class_path: str, init_args: dict):  # noqa: ANN201
    """A datamodule from a simpleslicenet name (e.g. ``BrainPhantom``), an anomalib name or a dotted path."""
    if "." in class_path:
        module_name, name = class_path.rsplit(".", 1)
        cls = getattr(importlib.import_module(module_name), name)
    elif class_path in datamodules.__all__:
        cls = getattr(datamodules, class_path)
    else:
        cls = getattr(importlib.import_module("anomalib.data"), class_path)
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in init_args.items()}
    return cls(**args)


def _export_size(engine, model, out_dir: Path) -> tuple[int | None, str | None]:  # noqa: ANN001
    """Size in bytes of the OpenVINO export (xml + bin), or the reason it failed."""
    try:
        engine.export(model, export_type=ExportType.OPENVINO, export_root=out_dir / "export")
    except Exception as error:  # noqa: BLE001 - a failed export is a result to report, not a crash
        return None, f"{type(error).__name__}: {error}"
    files = [p for p in (out_dir / "export").rglob("*") if p.suffix in {".xml", ".bin"}]
    return (sum(p.stat().st_size for p in files) or None), None


def run_single(spec: dict, out_dir: Path) -> dict:
    """Fit, validate and test one (model, dataset, seed); return the result record."""
    quiet_lightning_messages()
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(spec["seed"], workers=True)
    datamodule = load_datamodule(spec["dataset_class"], {**spec["dataset_args"], "seed": spec["seed"]})
    # Maps are not written during the sweep; the example picture is drawn by a callback instead.
    # The spec holds every argument (simpleslicenet.benchmark.config): no registered defaults are added here.
    model = get_model_class(spec["model"])(**{"visualizer": False, **spec["model_args"]})
    timer = InferenceTimer()
    example = ExampleDrawer(out_dir / "example.png", spec["label"])
    breakdown = MetricBreakdown()
    calibrated = CalibratedEvaluation()
    callbacks = [timer, example, breakdown, calibrated]
    if spec.get("select_checkpoint"):
        callbacks.append(ValidationSliceAUROCCheckpoint(**spec["select_checkpoint"]))
    # A run's epochs are a few dozen volumes: log every step, or the curve has no training points.
    trainer = {"accelerator": "cpu", "devices": 1, "log_every_n_steps": 1, **spec["trainer"]}
    engine = Engine(
        default_root_dir=out_dir / "engine",
        # The loss and validation curves of the run: out_dir/metrics.csv.
        logger=CSVLogger(out_dir, name="", version=""),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **trainer,
    )
    start = time.perf_counter()
    engine.fit(model, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start
    # The tested model (the final one, or the selected checkpoint) chooses its Dice threshold on validation.
    selected = callbacks[-1].best_model_path if spec.get("select_checkpoint") else None
    engine.validate(model, datamodule=datamodule, ckpt_path=selected)
    if len(getattr(datamodule, "calibration_data", ())):
        # Label-free outputs: p-values against the held-out healthy training volumes.
        calibrated.calibration = calibrate_model(engine, model, datamodule.calibration_dataloader(), ckpt_path=selected)
        calibrated.calibration.save(out_dir / "calibration.json")
    timer.seconds.clear()
    [metrics] = engine.test(model, datamodule=datamodule, ckpt_path=selected)
    n_train = len(datamodule.train_data)
    params = sum(p.numel() for p in model.model.parameters())
    trainable = sum(p.numel() for p in model.model.parameters() if p.requires_grad)
    export_bytes, export_error = _export_size(engine, model, out_dir) if spec.get("export") else (None, None)
    checkpoint = selected or (engine.trainer.checkpoint_callback.best_model_path if engine.trainer.checkpoint_callback else "")
    return {
        **spec,
        "metrics": {name: float(value) for name, value in metrics.items()},
        "breakdown": breakdown.results(),
        "calibrated": calibrated.results(),
        "volume_pvalues": calibrated.volume_pvalues() if calibrated.calibration is not None else None,
        "val_threshold": model.dice_threshold,
        # Lightning gives an absolute path; a sweep's output folder is usually relative to the working folder.
        "checkpoint": str(Path(checkpoint).resolve().relative_to(Path(out_dir).resolve())) if checkpoint else None,
        "fit_seconds": fit_seconds,
        "fit_seconds_per_volume_epoch": fit_seconds / max(1, n_train * engine.trainer.current_epoch),
        "epochs": engine.trainer.current_epoch,
        "inference_seconds_per_volume": timer.steady,
        "peak_ram_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "parameters": params,
        "trainable_parameters": trainable,
        "export_bytes": export_bytes,
        "export_error": export_error,
        "example": example.path.name if example.drawn else None,
        "device": str(model.device),
        "n_train_volumes": n_train,
        "n_test_volumes": len(datamodule.test_data),
        "torch_threads": torch.get_num_threads(),
    }


def run_records(sweep: str | Path, model: str = "*", dataset: str = "*") -> list[Path]:
    """The result files of a sweep's finished runs (``<sweep>/runs/<dataset>__<model>__*.json``), sorted."""
    found = (Path(sweep) / "runs").glob(f"{dataset}__{model}__*.json")
    return sorted(path for path in found if not path.name.endswith(".spec.json"))


def retest_run(record: str | Path, callbacks: list, validate: bool = False, calibration: bool = False) -> Engine:
    """Test a finished run's checkpoint again on its own dataset and seed, with ``callbacks`` attached.

    ``record`` is the run's result file (``runs/<run id>.json``); ``validate`` first runs the validation
    split through the callbacks too, and ``calibration`` then predicts the calibration split (the healthy
    volumes held out of training; the callbacks see them in ``on_predict_batch_end``). Returns the
    engine, whose trainer still holds the datamodule.
    """
    record = Path(record)
    spec = json.loads(record.read_text())
    seed_everything(spec["seed"], workers=True)
    datamodule = load_datamodule(spec["dataset_class"], {**spec["dataset_args"], "seed": spec["seed"]})
    model = get_model_class(spec["model"])(**{"visualizer": False, **spec["model_args"]})
    checkpoint = str(record.with_suffix("") / spec["checkpoint"])
    with tempfile.TemporaryDirectory() as scratch:
        engine = Engine(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, callbacks=callbacks, default_root_dir=scratch)
        if validate:
            engine.validate(model, datamodule=datamodule, ckpt_path=checkpoint, verbose=False)
        if calibration:
            datamodule.setup()  # idempotent; the split exists once the datamodule is set up
            engine.predict(model, dataloaders=datamodule.calibration_dataloader(), ckpt_path=checkpoint, return_predictions=False)
        engine.test(model, datamodule=datamodule, ckpt_path=checkpoint, verbose=False)
    return engine


def retest_parser(description: str, name: str, sweep_help: str = "a sweep's output folder (its runs/ hold the checkpoints)") -> argparse.ArgumentParser:
    """Arguments every re-testing script takes: the sweep, ``--model`` and ``--output`` (``benchmarks/results/<name>.json``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("sweep", type=Path, help=sweep_help)
    parser.add_argument("--model", default="SimpleSliceNet", help="the runs' model label")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results") / f"{name}.json")
    return parser


def write_report(report: dict, output: str | Path, tables: list[str]) -> dict:
    """Write a re-testing script's ``report`` as JSON to ``output`` (whole or not at all), print its ``tables``."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output, json.dumps(report, indent=2) + "\n")
    for text in tables:
        print(text, end="\n\n")
    print(f"wrote {output}")
    return report


def main(argv: list[str] | None = None) -> None:
    """``single_run SPEC.json RESULT.json``: the result is written atomically, only on success."""
    argv = sys.argv[1:] if argv is None else argv
    spec_path, result_path = Path(argv[0]), Path(argv[1])
    spec = json.loads(spec_path.read_text())
    result = run_single(spec, result_path.parent / spec["run_id"])
    atomic_write_text(result_path, json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
