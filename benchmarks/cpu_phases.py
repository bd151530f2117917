"""SimpleSliceNet on the CPU phase by phase, on the same data in one run: training, testing, prediction.

Each phase reports wall-clock, user and system time and minor page faults (``getrusage``), so a phase
whose time goes to the kernel shows it:

1. **training**, per epoch and per volume, the first epoch (the frozen encoder runs on every training
   volume) apart from the later ones (cached features: the flow only), validation apart; then
   **testing** per volume (``Engine.test``). The plain ``SimpleSliceNet()`` by default (``--config``
   takes a model config instead) on the brain phantom with 16 healthy training scans, at 1 mm on the
   192×192×96 model grid (``--spacing 2``: 2 mm on 96×104×48), seed 0, in a child process.
2. **predict** per scan, with the trained model as a checkpoint and as an OpenVINO export:
   ``simpleslicenet predict`` as a whole process (start-up included) over ``--scans`` 1-mm scans on
   the 181×217×181 ICBM grid (the scans of ``predict_profile.py``).
3. **reference**: one training step of the authors' formulation on the same grid and CPU (WideResNet50
   layers 2 and 3 with random weights, unfolded 3×3 features pooled to 512, depth triplets, an 8-block
   flow on 512 dimensions with a 128-dimensional condition, four steps of 4,096 features, their loss),
   against this package's training step per volume.

Writes ``benchmarks/results/cpu_phases_<grid>.json`` and prints a markdown table. Timings depend on
what else runs on the machine: compare figures of one run only.

Usage::

    python benchmarks/cpu_phases.py                       # 1 mm, 6 epochs, 24 scans
    python benchmarks/cpu_phases.py --spacing 2 --epochs 2 --scans 4 --no-reference   # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main"]

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
GRIDS = {1.0: (192, 192, 96), 2.0: (96, 104, 48)}


# ------------------------------------------------------------------------------------------- clock
def usage(who: int = resource.RUSAGE_SELF) -> dict[str, float]:
    """Wall clock, user and system seconds and minor page faults so far."""
    now = resource.getrusage(who)
    return {"wall_s": time.perf_counter(), "user_s": now.ru_utime, "sys_s": now.ru_stime, "page_faults": now.ru_minflt}


def spent(start: dict[str, float], end: dict[str, float], count: int = 1) -> dict[str, float]:
    """What was spent between two :func:`usage` readings, per one of ``count`` items."""
    return {key: (end[key] - start[key]) / count for key in start}


# ------------------------------------------------------------------------------ training and testing
def train_and_test(args: argparse.Namespace, work: Path) -> dict:
    """Child process: fit and test with a clock on every phase; saves the checkpoint to ``work``."""
    import lightning
    import torch
    from anomalib.engine import Engine

    from simpleslicenet.data.datamodules.phantom import BrainPhantom
    from simpleslicenet.models.registry import config_init_args
    from simpleslicenet.models.simpleslicenet import SimpleSliceNet

    class PhaseClock(lightning.Callback):
        """Usage of each training epoch, validation and test, without the sanity check."""

        def __init__(self) -> None:
            self.phases: list[dict] = []
            self._open: tuple[str, int, dict] | None = None

        def _start(self, name: str, trainer: lightning.Trainer) -> None:
            self._open = (name, trainer.current_epoch, usage())

        def _stop(self, name: str, volumes: int) -> None:
            if self._open is None or self._open[0] != name:
                return
            _, epoch, start = self._open
            self._open = None
            self.phases.append({"phase": name, "epoch": epoch, "volumes": volumes, **spent(start, usage())})

        def on_train_epoch_start(self, trainer, pl_module) -> None:  # noqa: ANN001, D102
            self._start("train", trainer)

        def on_validation_epoch_start(self, trainer, pl_module) -> None:  # noqa: ANN001, D102
            if trainer.sanity_checking:
                return
            self._stop("train", len(trainer.datamodule.train_data))
            self._start("validate", trainer)

        def on_validation_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001, D102
            self._stop("validate", len(trainer.datamodule.val_data))

        def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001, D102
            self._stop("train", len(trainer.datamodule.train_data))

        def on_test_epoch_start(self, trainer, pl_module) -> None:  # noqa: ANN001, D102
            self._start("test", trainer)

        def on_test_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001, D102
            self._stop("test", len(trainer.datamodule.test_data))

    lightning.seed_everything(0, workers=True)
    datamodule = BrainPhantom(spacing_mm=args.spacing, target_shape=GRIDS[args.spacing], progress=False)
    datamodule.prepare_data()
    model = SimpleSliceNet(**(config_init_args(args.config) if args.config else {}))
    clock = PhaseClock()
    engine = Engine(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=[clock],
        default_root_dir=work / "engine",
        enable_progress_bar=False,
    )
    start = usage()
    engine.fit(model=model, datamodule=datamodule)
    fit = spent(start, usage())
    metrics = engine.test(model=model, datamodule=datamodule, verbose=False)[0]
    checkpoint = work / "model.ckpt"
    engine.trainer.save_checkpoint(checkpoint)
    return {
        "threads": torch.get_num_threads(),
        "settings": str(model.settings),
        "fit": fit,
        "phases": clock.phases,
        "test_metrics": {key: float(value) for key, value in metrics.items()},
        "checkpoint": str(checkpoint),
    }


# ------------------------------------------------------------------------------------------ predict
def export(checkpoint: Path, folder: Path) -> Path:
    """Child process: the checkpoint as an OpenVINO model; returns its ``.xml``."""
    from simpleslicenet.deploy.loading import load_checkpoint_model

    model, _ = load_checkpoint_model(checkpoint)
    return model.to_openvino(folder)


def predict_process(model: Path, scans: Path, output: Path, count: int) -> dict[str, float]:
    """``simpleslicenet predict`` over every scan in ``scans`` as a fresh process (``predict_profile.py``'s), per scan."""
    from predict_profile import whole_process

    start = usage(resource.RUSAGE_CHILDREN)
    whole_process(model, scans, output)
    return spent(start, usage(resource.RUSAGE_CHILDREN), count)


# ---------------------------------------------------------------------------------------- reference
def reference_step(grid: tuple[int, int, int]) -> dict:
    """Child process: one training step of the authors' formulation on ``grid``, per volume."""
    import torch

    from simpleslicenet.models.backbones import create_feature_extractor
    from simpleslicenet.models.simpleslicenet.features import aggregate_depth, positional_encoding_2d
    from simpleslicenet.models.simpleslicenet.conditions import PositionCodes
    from simpleslicenet.models.simpleslicenet.flow import ConditionalFlow
    from simpleslicenet.models.simpleslicenet.lightning_model import fit_flow_on_features
    from simpleslicenet.models.simpleslicenet.loss import create_loss

    from speed import unfolded_embedding

    torch.manual_seed(0)
    width, height, depth = grid
    backbone = create_feature_extractor("wide_resnet50_2", ["layer2", "layer3"], "random").eval()
    class FreiaFlow(ConditionalFlow):
        """The same blocks run by FrEIA itself, each row's condition a copy of its code (as the authors' code does)."""

        def forward(self, features: torch.Tensor, conditions: PositionCodes) -> tuple[torch.Tensor, torch.Tensor]:
            return self.inn(features, c=[conditions.dense()])

    flow = FreiaFlow(dims=512, condition_dims=128, blocks=8, clamp=1.9)
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-3)
    loss = create_loss("authors_triplet")
    images = torch.randn(depth, 3, height, width)

    def step(images: torch.Tensor) -> None:
        with torch.no_grad():
            features = unfolded_embedding(backbone(images), [512, 512], 512)  # the whole volume at once
            cells = aggregate_depth(features, 3, 3)
            rows = cells.permute(0, 2, 3, 1).flatten(0, 2)
            code = positional_encoding_2d(128, *cells.shape[-2:]).unsqueeze(0).expand(cells.shape[0], -1, -1, -1)
            conditions = code.permute(0, 2, 3, 1).flatten(0, 2)
        kept = rows.shape[0] // 4096 * 4096  # the remainder is dropped
        fit_flow_on_features(flow, loss, rows[:kept], PositionCodes.of_rows(conditions[:kept]), optimizer, features_per_step=4096)

    step(images[:24])  # warm-up (one flow step of 4,096 features)
    start = usage()
    step(images)
    return spent(start, usage())


# --------------------------------------------------------------------------------------------- main
def child(kind: str, args: argparse.Namespace, work: Path) -> dict:
    """Run one phase in a fresh interpreter (its memory and page faults its own)."""
    command = [sys.executable, __file__, "--child", kind, "--work", str(work), "--spacing", str(args.spacing)]
    command += ["--epochs", str(args.epochs)] + (["--config", str(args.config)] if args.config else [])
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode:
        msg = f"{kind} failed ({completed.returncode}): {completed.stderr[-3000:]}"
        raise RuntimeError(msg)
    return json.loads((work / f"{kind}.json").read_text())


def summary(phases: list[dict], name: str, epochs: slice) -> dict | None:
    """Per-volume usage of phase ``name`` over the epochs in ``epochs``."""
    rows = [row for row in phases if row["phase"] == name][epochs]
    if not rows:
        return None
    volumes = sum(row["volumes"] for row in rows)
    return {key: sum(row[key] for row in rows) / volumes for key in ("wall_s", "user_s", "sys_s", "page_faults")}


def markdown(report: dict) -> str:
    """The table of a report."""
    lines = [
        f"SimpleSliceNet on {report['machine']['cpus']} CPU cores ({report['machine']['torch_threads']} torch threads), "
        f"{report['spacing_mm']:g} mm, model grid {'×'.join(map(str, report['grid']))}",
        "",
        "| phase | per | wall s | user s | system s | system / user | page faults |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in report["table"].items():
        if row is None:
            continue
        share = row["sys_s"] / row["user_s"] if row["user_s"] else float("nan")
        lines.append(
            f"| {name} | {row['per']} | {row['wall_s']:.2f} | {row['user_s']:.2f} | {row['sys_s']:.2f} "
            f"| {share:.0%} | {row['page_faults']:,.0f} |"
        )
    reference = report.get("reference")
    if reference:
        lines += ["", f"The authors' training step on the same grid: {reference['wall_s']:.1f} s a volume, "
                  f"{report['reference_ratio']:.1f}× this package's later-epoch step."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spacing", type=float, default=1.0, choices=sorted(GRIDS))
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--scans", type=int, default=24, help="1-mm scans for predict")
    parser.add_argument("--config", type=Path, default=None, help="a model config (default: SimpleSliceNet())")
    parser.add_argument("--no-reference", action="store_true", help="skip the authors' training step")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))  # the sibling scripts whose helpers this one reuses
    grid = GRIDS[args.spacing]
    work = args.work or Path(tempfile.mkdtemp(prefix="simpleslicenet-cpu-phases-"))
    work.mkdir(parents=True, exist_ok=True)

    if args.child:
        if args.child == "fit":
            result = train_and_test(args, work)
        elif args.child == "export":
            result = {"xml": str(export(work / "model.ckpt", work / "export"))}
        else:
            result = reference_step(grid)
        (work / f"{args.child}.json").write_text(json.dumps(result))
        return result

    fitted = child("fit", args, work)
    start = time.perf_counter()
    exported = child("export", args, work)
    export_s = time.perf_counter() - start
    from predict_profile import prepare_scans

    scans = work / "scans"
    prepare_scans(scans, args.scans)
    predict = {
        kind: predict_process(Path(model), scans, work / f"maps_{kind}", args.scans)
        for kind, model in (("export", exported["xml"]), ("checkpoint", fitted["checkpoint"]))
    }
    phases = fitted["phases"]
    table = {
        "training, first epoch": summary(phases, "train", slice(0, 1)),
        "training, later epochs": summary(phases, "train", slice(1, None)),
        "validation": summary(phases, "validate", slice(None)),
        "test (Engine.test)": summary(phases, "test", slice(None)),
        "predict, export": predict["export"],
        "predict, checkpoint": predict["checkpoint"],
    }
    for name, row in table.items():
        if row is not None:
            row["per"] = "scan (whole process)" if name.startswith("predict") else "volume"
    report = {
        "benchmark": "cpu_phases",
        "spacing_mm": args.spacing,
        "grid": list(grid),
        "epochs": args.epochs,
        "scans": args.scans,
        "machine": {"cpus": os.cpu_count(), "torch_threads": fitted["threads"], "platform": platform.platform()},
        "settings": fitted["settings"],
        "fit": fitted["fit"],
        "phases": phases,
        "test_metrics": fitted["test_metrics"],
        "export_s": export_s,
        "table": table,
    }
    later = table["training, later epochs"] or table["training, first epoch"]
    if not args.no_reference:
        report["reference"] = child("reference", args, work)
        report["reference_ratio"] = report["reference"]["wall_s"] / later["wall_s"]
    RESULTS.mkdir(exist_ok=True)
    target = RESULTS / f"cpu_phases_{'x'.join(map(str, grid))}.json"
    target.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    print(f"\nwrote {target}")
    return report


if __name__ == "__main__":
    main()
