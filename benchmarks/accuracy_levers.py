"""SimpleSliceNet's defaults and inference-time levers on the built-in phantom, over training seeds.

Configurations, each trained once per seed on the phantom the stock command meets (``BrainPhantom()``'s
defaults: 2 mm, 96x104x48, a fixed split):

* ``plain``: ``SimpleSliceNet()``, what ``anomalib train --model SimpleSliceNet --data BrainPhantom``
  builds (``layers`` and ``smoothing_sigma`` resolved from the data);
* ``quick``: ``configs/model/simpleslicenet_phantom.yaml``, the README's main job;
* ``paper loss``: the plain defaults with the paper's training settings instead of this package's
  (push-pull loss, 4096 features per step, no depth conditioning): the defaults before they changed;
* ``quick+whole_brain``: the quick configuration on every slice the brain reaches
  (``BrainPhantom(crop="whole_brain")``) instead of the 48-slice slab;
* training levers, one at a time, on ``quick before`` (the quick configuration before standardised
  inputs and brain cells became its settings; called ``quick`` in ``accuracy_levers_round3.json`` and
  ``_round4.json``, which measured them): the noise ``σ`` as a share of each feature
  dimension's spread (``noise_scale="feature_std"``, ``σ`` 0.08 and 0.25; the features spread by about
  3.5 per dimension, so the absolute ``σ`` 0.08 is about 2% of it), standardised flow inputs
  (``standardize_features``), the flow trained on brain cells only (``train_cells="brain"``), the
  EfficientNet-Lite1 and Lite2 backbones (same stages; offline weights from the ``backbones`` extra),
  standardised inputs and brain cells together (what ``quick`` is now), and Lightning's
  ``deterministic=True`` (same settings: what it costs in time, and whether it changes anything);
* finer cells, one at a time on ``quick``: a depth cell every slice instead of every third
  (``depth_stride=1``), no in-plane neighbourhood averaging (``neighbourhood=1``), half the smoothing
  (``smoothing_sigma=1``, in voxels), and the first two together; and 8 pixels of slice padding
  (``slice_padding=8``, the ``"auto"`` value at these stages) instead of the quick configuration's 16;
  and end cells that average three slices, their window shifted inwards (``full_depth_windows=True``),
  instead of the two they have;
* the same phantom at 1 mm on a 192x208x96 grid (the same field of view at twice the resolution):
  ``plain 1 mm``, ``SimpleSliceNet()`` as it resolves itself there (stride-8/16 stages, 4 mm smoothing),
  and ``1 mm``, ``configs/model/simpleslicenet.yaml`` (the paper's settings), to say what the quick 2 mm
  configuration gives up against a 1 mm one.

The first two and ``1 mm`` are then tested through ``Engine.test`` (the model's own evaluator, threshold
from validation) once per inference-time variant, on the same weights: what the map is measured against
(the scan's median brain voxel, the default, or the paper's most likely cell, ``1 − exp(ℓ − max ℓ)``
smoothed in the authors' order) and where the map is smoothed (over the brain's voxels only, the
default, or over the whole slab); the others with the defaults only (``1 mm`` with its own map, the
paper's, under ``--default-variant-only``). For healthy test volumes it also
records where the hottest voxel sits along the slab, to show whether the first and last slices draw the
maximum (a boundary artifact), and for lesion test volumes whether it lies on a lesion: the volume score
is the hottest voxel, and a score that ranks a scan high for a voxel off its lesion is right by chance.

    python benchmarks/accuracy_levers.py                 # every configuration, 3 seeds, 6 epochs (about 5 h on 2 CPU cores, 2 h at 1 mm)
    python benchmarks/accuracy_levers.py --configurations plain quick --default-variant-only   # the defaults (about 12 min)
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
# (label, map reference, smoothing region); the first is the package's default. Earlier rounds also
# measured "score→smooth" and volume scores from the top 0.1% and 1% of brain voxels (all lower than the maximum).
VARIANTS = [
    ("brain median, smoothed in the brain (default)", "brain_median", "brain"),
    ("brain median, smoothed over the slab", "brain_median", "volume"),
    ("peak: smooth→score over the slab", "peak", "volume"),
]
# The paper's training settings, the defaults of this model before they were changed on these results.
PAPER_TRAINING = {"loss": "bgspp", "features_per_step": 4096, "depth_position": False}
# The quick configuration's settings before the levers below were measured.
PREVIOUS_QUICK = {"standardize_features": False, "train_cells": "all"}
# Changes to PREVIOUS_QUICK, one training lever each.
QUICK_LEVERS = {
    "quick+σ×spread 0.08": {"noise_scale": "feature_std", "noise_std": 0.08},
    "quick+σ×spread 0.25": {"noise_scale": "feature_std", "noise_std": 0.25},
    "quick+standardized": {"standardize_features": True},
    "quick+brain cells": {"train_cells": "brain"},
    "quick+lite1": {"backbone": "tf_efficientnet_lite1"},
    "quick+lite2": {"backbone": "tf_efficientnet_lite2"},
    "quick+standardized+brain cells": {"standardize_features": True, "train_cells": "brain"},
}
# Changes to today's quick configuration: finer cells for small lesions.
FINER_LEVERS = {
    "quick+depth stride 1": {"depth_stride": 1},
    "quick+neighbourhood 1": {"neighbourhood": 1},
    "quick+smoothing 1": {"smoothing_sigma": 1.0},
    "quick+neighbourhood 1+depth stride 1": {"neighbourhood": 1, "depth_stride": 1},
    "quick+slice padding 8": {"slice_padding": 8},
    "quick+full depth windows": {"full_depth_windows": True},
}
CONFIGURATIONS = (
    "plain", "quick", "paper loss", "quick+whole_brain", "quick before", *QUICK_LEVERS, "quick+deterministic", *FINER_LEVERS,
    "plain 1 mm", "1 mm",
)
ONE_MM = {"spacing_mm": 1.0, "target_shape": (192, 208, 96)}  # the 2 mm phantom's 96x104x48 field of view
DATA = {"quick+whole_brain": {"crop": "whole_brain"}, "plain 1 mm": ONE_MM, "1 mm": ONE_MM}
OWN_MAP = {"1 mm": VARIANTS[2]}  # simpleslicenet.yaml's own map: the paper's peak, smoothed over the slab
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


def _engine(root: Path, epochs: int, callbacks: list | None = None, deterministic: bool = False):  # noqa: ANN202
    from anomalib.engine import Engine

    return Engine(
        deterministic=deterministic,
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
    if configuration == "paper loss":
        return SimpleSliceNet(**PAPER_TRAINING, **PREVIOUS_QUICK)
    quick = registry.config_init_args(registry.packaged_config("simpleslicenet_phantom.yaml"))
    if configuration in ("quick", "quick+whole_brain", *FINER_LEVERS):
        return SimpleSliceNet(**{**quick, **FINER_LEVERS.get(configuration, {})})
    # "quick before", its levers and its deterministic twin.
    return SimpleSliceNet(**{**quick, **PREVIOUS_QUICK, **QUICK_LEVERS.get(configuration, {})})


def run(seeds: list[int], epochs: int, workdir: Path, configurations: list[str], variants: bool = True) -> list[dict]:
    """Train and test every configuration and variant; one record per (configuration, seed, variant)."""
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
            engine = _engine(folder, epochs, deterministic=configuration.endswith("deterministic"))
            start = time.perf_counter()
            engine.fit(model, datamodule=datamodule)
            train_s = time.perf_counter() - start
            own = [OWN_MAP[configuration]] if configuration in OWN_MAP else VARIANTS[:1]
            for label, reference, region in VARIANTS if variants and configuration in ("plain", "quick", *OWN_MAP) else own:
                model.set_map_settings(reference, region)
                hottest, breakdown = HottestVoxel(), MetricBreakdown()
                tester = _engine(folder, epochs, callbacks=[hottest, breakdown])
                # The Dice threshold is chosen again on validation maps made the same way as the test maps.
                tester.validate(model, datamodule=datamodule)
                start = time.perf_counter()
                (metrics,) = tester.test(model, datamodule=datamodule)
                edge = [p < EDGE_SLICES or p >= depth - EDGE_SLICES for p, depth in hottest.positions]
                record = {
                    "configuration": configuration,
                    "seed": seed,
                    "variant": label,
                    "layers": list(model.hparams["layers"] or []),
                    "smoothing_sigma": float(model.hparams["smoothing_sigma"]),
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
    labels = [v[0] for v in VARIANTS]
    keys = sorted(
        {(r["configuration"], r["variant"]) for r in records},
        key=lambda k: (CONFIGURATIONS.index(k[0]), labels.index(k[1])),
    )
    for configuration, variant in keys:
        group = [r for r in records if r["configuration"] == configuration and r["variant"] == variant]
        row = {"configuration": configuration, "variant": variant, "seeds": len(group)}
        for key in [*METRICS, *DIAGNOSTICS, "train_s"]:
            values = [r[key] for r in group if key in r]
            if values:
                row[key] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
        rows.append(row)
    return rows


def _table(rows: list[dict]) -> str:
    columns = [*METRICS, *DIAGNOSTICS]
    names = [*METRICS.values(), *DIAGNOSTICS.values()]
    lines = ["| configuration | variant | " + " | ".join(names) + " |", "|" + "---|" * (len(columns) + 2)]
    for row in rows:
        cells = [f"{row[c][0]:.3f} ± {row[c][1]:.3f}" if c in row else "n/a" for c in columns]
        lines.append(f"| {row['configuration']} | {row['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--workdir", type=Path, default=ROOT / "results" / "accuracy_levers")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--configurations", nargs="+", choices=CONFIGURATIONS, default=list(CONFIGURATIONS))
    parser.add_argument("--default-variant-only", action="store_true", help="test the package's default map and score only")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    records = run(args.seeds, args.epochs, args.workdir, args.configurations, variants=not args.default_variant_only)
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
