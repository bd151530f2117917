"""SimpleSliceNet's configurations on the built-in phantom, over training seeds.

Configurations, each trained once per seed on the phantom the stock command meets (``BrainPhantom()``'s
defaults: 2 mm, 96x104x48, a fixed split) and tested through ``Engine.test`` (the model's own
evaluator, Dice threshold from validation):

* ``plain``: ``SimpleSliceNet()``, what ``anomalib train --model SimpleSliceNet --data BrainPhantom``
  builds (``layers``, ``smoothing_sigma`` and ``slice_padding`` resolved from the data);
* ``quick``: ``configs/model/simpleslicenet_phantom.yaml``, the README's main job;
* ``quick paper variant``: the same settings with the paper's behaviour (``variant="paper"``);
* ``quick+whole_brain``: the quick configuration on every slice the brain reaches
  (``BrainPhantom(crop="whole_brain")``) instead of the 48-slice slab;
* ``quick+lite1``, ``quick+lite2``: the EfficientNet-Lite1 and Lite2 backbones (same stages; offline
  weights from the ``backbones`` extra);
* the same phantom at 1 mm on a 192x208x96 grid (the same field of view at twice the resolution):
  ``plain 1 mm``, ``SimpleSliceNet()`` as it resolves itself there, and ``1 mm``,
  ``configs/model/simpleslicenet.yaml`` (the paper's settings with the offline backbone).

For healthy test volumes it also records where the hottest voxel sits along the slab (whether the first
and last slices draw the maximum, a boundary artifact), and for lesion test volumes whether it lies on a
lesion: the volume score is the hottest voxel, and a scan ranked high for a voxel off its lesion is right
by chance. The history of earlier configurations is in ``docs/experiments/``.

    python benchmarks/accuracy_levers.py --configurations plain quick   # the defaults (about 12 min on 2 CPU cores)
    python benchmarks/accuracy_levers.py --seeds 0 --epochs 1 --configurations plain   # a check that everything runs

Prints a table (mean ± sample std over seeds) and writes ``benchmarks/results/accuracy_levers.json``.
Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "accuracy_levers.json"
METRICS = {
    "voxel_AUPRC": "voxel AUPRC",
    "voxel_AUROC": "voxel AUROC",
    "voxel_valDice": "Dice @ val thr.",
    "voxel_maxDice": "max Dice",
    "slice_AUROC": "slice AUROC",
    "volume_AUROC": "volume AUROC",
    "lesion_detection": "lesions ≥ 1 ml found",
    "lesion_FPclusters": "false clusters / healthy vol.",
}
BACKBONES = {"quick+lite1": "tf_efficientnet_lite1", "quick+lite2": "tf_efficientnet_lite2"}
CONFIGURATIONS = ("plain", "quick", "quick paper variant", "quick+whole_brain", *BACKBONES, "plain 1 mm", "1 mm")
ONE_MM = {"spacing_mm": 1.0, "target_shape": (192, 208, 96)}  # the 2 mm phantom's 96x104x48 field of view
DATA = {"quick+whole_brain": {"crop": "whole_brain"}, "plain 1 mm": ONE_MM, "1 mm": ONE_MM}
EDGE_SLICES = 3  # "at the slab's edge": the hottest voxel lies within this many slices of either end
DIAGNOSTICS = {
    "healthy_hottest_at_edge": f"healthy max within {EDGE_SLICES} slices of an end",
    "lesion_hottest_on_lesion": "lesion-scan max on the lesion",
}


class HottestVoxel(Callback):
    """Lightning callback: where each test volume's hottest brain voxel (its volume score) lies.

    For healthy volumes its slab position, for lesion volumes whether it lies on a lesion.
    """

    def __init__(self) -> None:
        super().__init__()
        self.positions: list[tuple[int, int]] = []  # healthy: (slice of the maximum, slices in the slab)
        self.on_lesion: list[bool] = []  # lesion volumes: is the maximum a lesion voxel?

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001, D102
        del trainer, pl_module, batch, batch_idx, dataloader_idx
        for _, rows in outputs.volumes():
            anomaly_map = outputs.anomaly_map[rows].squeeze(1) if outputs.anomaly_map.dim() == 4 else outputs.anomaly_map[rows]
            brain = outputs.brain_mask[rows]
            masked = torch.where(brain, anomaly_map, torch.full_like(anomaly_map, -torch.inf))
            hottest = int(masked.flatten().argmax())
            if int(outputs.volume_label[rows][0]) == 0:
                self.positions.append((hottest // (masked.shape[1] * masked.shape[2]), masked.shape[0]))
            else:
                self.on_lesion.append(bool(outputs.gt_mask[rows].flatten()[hottest]))


def _engine(root: Path, epochs: int, callbacks: list | None = None):  # noqa: ANN202
    from anomalib.engine import Engine

    return Engine(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        default_root_dir=root,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


def _model(configuration: str):  # noqa: ANN202
    from simpleslicenet.models import registry
    from simpleslicenet.models.simpleslicenet import SimpleSliceNet

    if configuration in ("plain", "plain 1 mm"):
        return SimpleSliceNet()
    if configuration == "1 mm":
        return SimpleSliceNet(**registry.config_init_args(registry.packaged_config("simpleslicenet.yaml")))
    quick = registry.config_init_args(registry.packaged_config("simpleslicenet_phantom.yaml"))
    if configuration == "quick paper variant":
        return SimpleSliceNet(**{**quick, "variant": "paper"})
    if configuration in BACKBONES:
        return SimpleSliceNet(**{**quick, "backbone": BACKBONES[configuration]})
    return SimpleSliceNet(**quick)


def run(seeds: list[int], epochs: int, workdir: Path, configurations: list[str]) -> list[dict]:
    """Train and test every configuration; one record per (configuration, seed)."""
    from lightning.pytorch import seed_everything

    from simpleslicenet.data.datamodules.phantom import BrainPhantom
    from simpleslicenet.metrics.breakdown import MetricBreakdown

    records = []
    for configuration in configurations:
        datamodule = BrainPhantom(progress=False, **DATA.get(configuration, {}))
        for seed in seeds:
            seed_everything(seed)
            model = _model(configuration)
            folder = workdir / f"{re.sub(r'[^A-Za-z0-9.+-]+', '_', configuration)}_seed{seed}"
            engine = _engine(folder, epochs)
            start = time.perf_counter()
            engine.fit(model, datamodule=datamodule)
            train_s = time.perf_counter() - start
            hottest, breakdown = HottestVoxel(), MetricBreakdown()
            tester = _engine(folder, epochs, callbacks=[hottest, breakdown])
            start = time.perf_counter()
            (metrics,) = tester.test(model, datamodule=datamodule)
            edge = [p < EDGE_SLICES or p >= depth - EDGE_SLICES for p, depth in hottest.positions]
            record = {
                "configuration": configuration,
                "seed": seed,
                "settings": model.settings.to_dict(),
                "train_s": round(train_s, 1),
                "test_s": round(time.perf_counter() - start, 1),
                "healthy_hottest_at_edge": sum(edge) / max(1, len(edge)),
                "lesion_hottest_on_lesion": sum(hottest.on_lesion) / max(1, len(hottest.on_lesion)),
                **{key: float(metrics[key]) for key in METRICS if key in metrics},
                "breakdown": breakdown.results(),
            }
            records.append(record)
            print(json.dumps(record), flush=True)
    return records


def _summary(records: list[dict]) -> list[dict]:
    rows = []
    for configuration in sorted({r["configuration"] for r in records}, key=CONFIGURATIONS.index):
        group = [r for r in records if r["configuration"] == configuration]
        row = {"configuration": configuration, "seeds": len(group)}
        for key in [*METRICS, *DIAGNOSTICS, "train_s"]:
            values = [r[key] for r in group if key in r]
            if values:
                row[key] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
        rows.append(row)
    return rows


def _table(rows: list[dict]) -> str:
    columns = [*METRICS, *DIAGNOSTICS]
    names = [*METRICS.values(), *DIAGNOSTICS.values()]
    lines = ["| configuration | " + " | ".join(names) + " |", "|" + "---|" * (len(columns) + 1)]
    for row in rows:
        cells = [f"{row[c][0]:.3f} ± {row[c][1]:.3f}" if c in row else "n/a" for c in columns]
        lines.append(f"| {row['configuration']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--workdir", type=Path, default=ROOT / "results" / "accuracy_levers")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--configurations", nargs="+", choices=CONFIGURATIONS, default=list(CONFIGURATIONS))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    records = run(args.seeds, args.epochs, args.workdir, args.configurations)
    rows = _summary(records)
    table = _table(rows)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from simpleslicenet.atomic import atomic_write_text

    atomic_write_text(
        args.out,
        json.dumps(
            {
                "command": shlex.join(["python", "benchmarks/accuracy_levers.py", *(argv if argv is not None else sys.argv[1:])]),
                "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads()},
                "epochs": args.epochs,
                "seeds": args.seeds,
                "wall_s": round(time.perf_counter() - start, 1),
                "records": records,
                "summary": [{k: list(v) if isinstance(v, tuple) else v for k, v in row.items()} for row in rows],
                "table": table,
            },
            indent=2,
        ),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
