"""Maps in a unit that transfers: the same maps in three units, each with its own validation threshold.

A Dice threshold chosen on the validation scans gives a lower test Dice than the best test threshold
when the map's unit (nats above the scan's median brain voxel) means different things on different scans. This script takes
a finished sweep's runs whose datamodule holds calibration scans (healthy, held out of training; e.g.
``configs/benchmark/protocol_calibrated.yaml``), tests each checkpoint again on its validation,
calibration and test scans, and scores the same maps in three units:

* ``nats``: the model's map as it is;
* ``scan z``: per scan, less the median of its brain voxels, over their robust spread (1.4826 × MAD);
* ``location z``: per location, less the calibration scans' mean there, over their standard deviation
  there (floored at the median of those deviations over the brain, so that a location where the
  calibration scans happen to agree does not blow up).

For each unit, the Dice threshold is chosen on the run's validation scans (exact, pooled over their
brain voxels) and applied to its test scans: Dice there against the best test Dice, voxel AUPRC, volume
AUROC (the hottest brain voxel, overall and by lesion family) and lesions of at least 1 ml found with
the false clusters per healthy scan (:func:`simpleslicenet.clusters.count_lesions`). The ``nats`` maps
must reproduce the run's recorded volume AUROC, or the run is refused.

How many labelled validation scans does a threshold need? For the map as it is, the threshold is also
chosen on ``k`` of the run's validation scans drawn at random (``--draws`` draws for each ``k`` of
``--val-sizes``, each draw holding a lesion scan), and the test Dice at it is compared with the best one.

    python benchmarks/map_units.py benchmarks/results/protocol_calibrated --output docs/experiments/map_units.json

Prints a table per dataset (mean ± std over the seeds) and writes the JSON (every run's figures).
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from simpleslicenet.benchmark.scan_maps import ScanMaps, location_statistics, retest_with_calibration
from simpleslicenet.metrics.exact import (
    dice_at_threshold,
    exact_auroc,
    exact_average_precision,
    exact_max_dice,
    exact_threshold_for_max_dice,
)

UNITS = ("nats", "scan z", "location z")
FAMILIES = ("tumour", "small", "multifocal", "hypointense")
MIN_LESION_ML = 1.0
VAL_SIZES = (4, 9, 18)


class LocationNorm:
    """Mean and standard deviation of the calibration scans' maps at each location."""

    def __init__(self, scans: list[dict]) -> None:
        covered, mean, spread = location_statistics([s["map"] for s in scans], [s["brain"] for s in scans])
        everywhere = np.median(np.concatenate([s["map"][s["brain"]] for s in scans]).astype(np.float64))
        self.mean = np.where(covered, mean, everywhere)
        floor = float(np.median(spread[covered]))
        self.std = np.where(covered, np.maximum(spread, floor), floor)

    def __call__(self, amap: np.ndarray) -> np.ndarray:
        return ((amap - self.mean) / self.std).astype(np.float32)


def in_unit(unit: str, scan: dict, location: LocationNorm) -> np.ndarray:
    """One scan's map in ``unit``."""
    amap = scan["map"]
    if unit == "nats":
        return amap
    if unit == "scan z":
        inside = amap[scan["brain"]]
        centre = np.median(inside)
        return ((amap - centre) / (1.4826 * np.median(np.abs(inside - centre)))).astype(np.float32)
    return location(amap)


def pooled(scans: list[dict], maps: list[np.ndarray] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Brain-voxel scores (of ``maps``, else the scans' own) and lesion labels of ``scans``, pooled."""
    maps = [s["map"] for s in scans] if maps is None else maps
    scores = np.concatenate([m[s["brain"]] for m, s in zip(maps, scans, strict=True)])
    return torch.from_numpy(scores), torch.from_numpy(np.concatenate([s["lesion"][s["brain"]] for s in scans]))


def volume_auroc(lesion: list[float], healthy: list[float]) -> float:
    """AUROC of lesion scans' scores against healthy scans'."""
    return exact_auroc(torch.tensor(lesion + healthy), torch.tensor([True] * len(lesion) + [False] * len(healthy)))


def evaluate_unit(unit: str, maps: ScanMaps, location: LocationNorm, family: dict[int, str]) -> dict:
    """The unit's validation threshold and test figures."""
    from simpleslicenet.clusters import count_lesions

    validation = maps.scans["validation"]
    threshold = exact_threshold_for_max_dice(*pooled(validation, [in_unit(unit, s, location) for s in validation]))
    converted = [in_unit(unit, s, location) for s in maps.scans["test"]]
    scores, labels = pooled(maps.scans["test"], converted)
    result = {
        "threshold": threshold,
        "dice_at_val_threshold": dice_at_threshold(scores, labels, threshold),
        "max_dice": exact_max_dice(scores, labels),
        "voxel_auprc": exact_average_precision(scores, labels),
    }
    volume = defaultdict(list)
    lesions = found = false_clusters = healthy = 0
    for amap, scan in zip(converted, maps.scans["test"], strict=True):
        group = family.get(scan["index"], "lesion") if scan["label"] else "healthy"
        volume[group].append(float(amap[scan["brain"]].max()))
        n, hit, false = count_lesions((amap >= threshold) & scan["brain"], scan["lesion"], scan["voxel_ml"], MIN_LESION_ML)
        lesions, found = lesions + n, found + hit
        if group == "healthy":
            false_clusters, healthy = false_clusters + false, healthy + 1
    every_lesion = [v for group, values in volume.items() if group != "healthy" for v in values]
    result["volume_auroc"] = volume_auroc(every_lesion, volume["healthy"])
    result |= {f"volume_auroc_{f}": volume_auroc(volume[f], volume["healthy"]) for f in FAMILIES if volume[f]}
    result["lesions_found"] = found / lesions if lesions else float("nan")
    result["false_clusters_per_healthy_scan"] = false_clusters / healthy
    return result


def dice_from_fewer_scans(maps: ScanMaps, sizes: tuple[int, ...], draws: int, rng: np.random.Generator) -> dict[str, list[float]]:
    """Test Dice below the best one (the map as it is) with thresholds from ``k`` validation scans, per draw."""
    scores, labels = pooled(maps.scans["test"])
    best = exact_max_dice(scores, labels)
    validation = maps.scans["validation"]
    with_lesion = [i for i, s in enumerate(validation) if s["lesion"].any()]
    gaps: dict[str, list[float]] = {}
    for k in (k for k in sizes if k <= len(validation) and with_lesion):
        gaps[str(k)] = []
        for _ in range(draws if k < len(validation) else 1):
            chosen = rng.choice(len(validation), size=k, replace=False)
            while not set(chosen.tolist()) & set(with_lesion):
                chosen = rng.choice(len(validation), size=k, replace=False)
            threshold = exact_threshold_for_max_dice(*pooled([validation[i] for i in chosen]))
            gaps[str(k)].append(best - dice_at_threshold(scores, labels, threshold))
    return gaps


def evaluate_run(record: Path, sizes: tuple[int, ...] = VAL_SIZES, draws: int = 20) -> dict:
    """Test one run's checkpoint again; every unit's figures, and the Dice gap from fewer validation scans."""
    from simpleslicenet.metrics.breakdown import lesion_families

    spec = json.loads(record.read_text())
    maps, engine = retest_with_calibration(record)
    family = lesion_families(engine.trainer)
    location = LocationNorm(maps.scans["calibration"])
    units = {unit: evaluate_unit(unit, maps, location, family) for unit in UNITS}
    recorded = spec["metrics"]["volume_AUROC"]
    if abs(units["nats"]["volume_auroc"] - recorded) > 1e-9:
        msg = f"{record}: the maps' volume AUROC {units['nats']['volume_auroc']} does not reproduce the recorded {recorded}"
        raise RuntimeError(msg)
    counts = {split: len(scans) for split, scans in maps.scans.items()}
    fewer = dice_from_fewer_scans(maps, sizes, draws, np.random.default_rng(spec["seed"]))
    return {
        "run": record.stem, "dataset": spec["dataset"], "seed": spec["seed"], "scans": counts, "recorded": spec["metrics"],
        "units": units, "dice_gap_from_k_validation_scans": fewer,
    }


COLUMNS = (
    ("dice_at_val_threshold", "Dice @ val thr."), ("max_dice", "max Dice"), ("gap", "max − val"),
    ("voxel_auprc", "voxel AUPRC"), ("volume_auroc", "volume AUROC"),
    *((f"volume_auroc_{f}", f) for f in FAMILIES),
    ("lesions_found", "lesions ≥ 1 ml found"), ("false_clusters_per_healthy_scan", "false clusters / healthy scan"),
)


def table(runs: list[dict], dataset: str) -> str:
    """Markdown: one row per unit, mean ± std over the seeds."""
    chosen = [run for run in runs if run["dataset"] == dataset]
    lines = [f"| unit ({dataset}) | " + " | ".join(name for _, name in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for unit in UNITS:
        cells = []
        for key, _ in COLUMNS:
            values = [
                r["units"][unit]["max_dice"] - r["units"][unit]["dice_at_val_threshold"] if key == "gap" else r["units"][unit].get(key)
                for r in chosen
            ]
            values = [v for v in values if v is not None and v == v]
            cells.append(f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}" if values else "–")
        lines.append(f"| {unit} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gap_table(runs: list[dict], dataset: str) -> str:
    """Markdown: the map's Dice gap with thresholds from ``k`` validation scans, pooled over seeds and draws."""
    chosen = [run for run in runs if run["dataset"] == dataset]
    sizes = list(dict.fromkeys(k for run in chosen for k in run["dice_gap_from_k_validation_scans"]))
    lines = [f"| validation scans ({dataset}) | max Dice − Dice @ val thr. (mean ± std over seeds and draws) | draws above 0.08 |", "|---|---|---|"]
    for k in sizes:
        gaps = [g for run in chosen for g in run["dice_gap_from_k_validation_scans"].get(k, [])]
        spread = statistics.stdev(gaps) if len(gaps) > 1 else 0.0
        lines.append(f"| {k} | {statistics.mean(gaps):.3f} ± {spread:.3f} | {sum(g > 0.08 for g in gaps)} of {len(gaps)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    from simpleslicenet.benchmark.single_run import retest_parser, run_records, write_report
    from simpleslicenet.quiet import quiet_lightning_messages

    parser = retest_parser(__doc__.splitlines()[0], "map_units", "a sweep's output folder whose runs hold calibration scans")
    parser.add_argument("--val-sizes", type=int, nargs="+", default=list(VAL_SIZES), help="validation scans a threshold is chosen on")
    parser.add_argument("--draws", type=int, default=20, help="random draws of validation scans for each size")
    args = parser.parse_args(argv)
    quiet_lightning_messages()
    sizes = tuple(args.val_sizes)
    runs = [evaluate_run(record, sizes, args.draws) for record in run_records(args.sweep, model=args.model)]
    report = {"sweep": args.sweep.name, "model": args.model, "units": UNITS, "val_sizes": sizes, "draws": args.draws, "runs": runs}
    datasets = list(dict.fromkeys(run["dataset"] for run in runs))
    return write_report(report, args.output, [table(runs, d) for d in datasets] + [gap_table(runs, d) for d in datasets])


if __name__ == "__main__":
    main()
