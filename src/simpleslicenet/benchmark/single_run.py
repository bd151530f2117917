"""One benchmark run in its own process: fit, evaluate, time, measure memory, write one JSON.

Run as ``python -m simpleslicenet.benchmark.single_run SPEC.json RESULT.json``. A process per run
keeps runs independent (no allocator or cache carried over) and makes the process's peak resident
memory the run's peak RAM.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

__all__ = ["run_single", "evaluate_model", "load_datamodule"]


def load_datamodule(class_path: str, init_args: dict):  # noqa: ANN201
    """A datamodule from a short registered name (e.g. ``BrainPhantom``) or a dotted path."""
    import importlib

    from simpleslicenet.plugin import DATAMODULE_CLASSES

    if "." in class_path:
        module_name, name = class_path.rsplit(".", 1)
    elif class_path in DATAMODULE_CLASSES:
        module_name, name = DATAMODULE_CLASSES[class_path], class_path
    else:
        module_name, name = "anomalib.data", class_path
    cls = getattr(importlib.import_module(module_name), name)
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in init_args.items()}
    return cls(**args)


def _pre_process(model, batch):  # noqa: ANN001, ANN202
    """Apply the model's pre-processing the way anomalib's callback does during testing."""
    if model.pre_processor is not None and getattr(model.pre_processor, "transform", None) is not None:
        batch.image, batch.gt_mask = model.pre_processor.transform(batch.image, batch.gt_mask)
    return batch


def evaluate_model(  # noqa: ANN201
    model,  # noqa: ANN001
    dataloader,  # noqa: ANN001
    device: str = "cpu",
    on_batch=None,  # noqa: ANN001
    val_threshold: float | None = None,
):
    """Raw (un-normalised) predictions of ``model`` on every volume, with per-volume wall times.

    Returns the metric accumulator filled with every volume and the list of seconds per volume.
    ``on_batch(batch)`` is called with each predicted batch (e.g. to draw an example);
    ``val_threshold`` (chosen on the validation split) makes the test Dice exact.
    """
    import torch

    from simpleslicenet.metrics import VolumeMetricAccumulator

    accumulator = VolumeMetricAccumulator(val_threshold=val_threshold)
    seconds = []
    model.eval().to(device)
    with torch.no_grad():
        for index, batch in enumerate(dataloader):
            batch = batch.to(device) if hasattr(batch, "to") else batch
            start = time.perf_counter()
            batch = _pre_process(model, batch)
            output = model.test_step(batch, index)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds.append((time.perf_counter() - start) / max(1, len(output.volumes())))
            output = output.to("cpu") if hasattr(output, "to") else output
            accumulator.update(output)
            if on_batch is not None:
                on_batch(output)
    return accumulator, seconds


def _save_example(batch, path: Path, title: str) -> bool:  # noqa: ANN001
    """Draw the slice with the largest lesion area: image, anomaly map, true outline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    area = batch.gt_mask.flatten(1).sum(1)
    if area.max() == 0:
        return False
    row = int(area.argmax())
    image = batch.image[row, 0].float().numpy()
    amap = batch.anomaly_map[row].float().numpy()
    mask = batch.gt_mask[row].float().numpy()
    fig, axes = plt.subplots(1, 2, figsize=(6, 3.2))
    for ax in axes:
        ax.imshow(image, cmap="gray", origin="lower")
        ax.contour(mask, levels=[0.5], colors="lime", linewidths=0.8, origin="lower")
        ax.axis("off")
    axes[1].imshow(amap, cmap="jet", alpha=0.5, origin="lower")
    axes[0].set_title("scan + lesion outline", fontsize=8)
    axes[1].set_title(f"{title}: anomaly map", fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def _export_size(engine, model, out_dir: Path) -> tuple[int | None, str | None]:  # noqa: ANN001
    """Size in bytes of the OpenVINO export (xml + bin), or the reason it failed."""
    from anomalib.deploy import ExportType

    try:
        engine.export(model, export_type=ExportType.OPENVINO, export_root=out_dir / "export")
    except Exception as error:  # noqa: BLE001 - a failed export is a result to report, not a crash
        return None, f"{type(error).__name__}: {error}"
    files = [p for p in (out_dir / "export").rglob("*") if p.suffix in {".xml", ".bin"}]
    return (sum(p.stat().st_size for p in files) or None), None


def run_single(spec: dict, out_dir: Path) -> dict:
    """Fit and evaluate one (model, dataset, seed); return the result record."""
    import torch
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    from simpleslicenet.models.registry import create_model
    from simpleslicenet.plugin import register

    register()
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(spec["seed"], workers=True)
    datamodule = load_datamodule(spec["dataset_class"], {**spec["dataset_args"], "seed": spec["seed"]})
    datamodule.prepare_data()
    datamodule.setup()
    model = create_model(spec["model"], **spec["model_args"])
    trainer = {"accelerator": "cpu", "devices": 1, **spec["trainer"]}
    device = "cuda" if trainer["accelerator"] in {"gpu", "cuda"} or (
        trainer["accelerator"] == "auto" and torch.cuda.is_available()
    ) else "cpu"
    engine = Engine(
        default_root_dir=out_dir / "engine",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer,
    )
    start = time.perf_counter()
    engine.fit(model, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start
    n_train = len(datamodule.train_data)

    val_acc, _ = evaluate_model(model, datamodule.val_dataloader(), device)
    threshold = val_acc.threshold_for_max_dice()
    example = out_dir / "example.png"
    drew = []

    def draw(batch) -> None:  # noqa: ANN001
        if not drew and batch.gt_mask.any():
            drew.append(_save_example(batch, example, spec["label"]))

    test_acc, seconds = evaluate_model(model, datamodule.test_dataloader(), device, draw, threshold)
    metrics = test_acc.compute()
    timed = seconds[1:] or seconds  # the first volume pays for lazy initialisation
    params = sum(p.numel() for p in model.model.parameters())
    trainable = sum(p.numel() for p in model.model.parameters() if p.requires_grad)
    export_bytes, export_error = _export_size(engine, model, out_dir) if spec.get("export") else (None, None)
    result = {
        **spec,
        "metrics": metrics,
        "val_threshold": threshold,
        "fit_seconds": fit_seconds,
        "fit_seconds_per_volume_epoch": fit_seconds / max(1, n_train * engine.trainer.current_epoch),
        "epochs": engine.trainer.current_epoch,
        "inference_seconds_per_volume": sorted(timed)[len(timed) // 2],
        "peak_ram_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "parameters": params,
        "trainable_parameters": trainable,
        "export_bytes": export_bytes,
        "export_error": export_error,
        "example": example.name if drew and drew[0] else None,
        "device": device,
        "n_train_volumes": n_train,
        "n_test_volumes": len(datamodule.test_data),
        "torch_threads": torch.get_num_threads(),
    }
    return result


def main(argv: list[str] | None = None) -> None:
    """``single_run SPEC.json RESULT.json``: the result is written atomically, only on success."""
    argv = sys.argv[1:] if argv is None else argv
    spec_path, result_path = Path(argv[0]), Path(argv[1])
    spec = json.loads(spec_path.read_text())
    result = run_single(spec, result_path.parent / spec["run_id"])
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    os.replace(tmp, result_path)


if __name__ == "__main__":
    main()
