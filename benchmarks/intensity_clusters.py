"""A voxel-level intensity channel under peak- and cluster-level control, beside the flow's label-free masks.

The flow's cells are too coarse for lesions of a few millimetres. This script asks whether single-voxel
evidence finds them while healthy scans stay unflagged, label-free, and what it adds to the flow. It takes
a finished sweep whose runs hold calibration scans (``configs/benchmark/protocol_calibrated.yaml``) and,
for each run, on its own dataset and seed:

* **the channel**: per location of the model grid, the mean and standard deviation of the run's healthy
  training volumes (as the model reads them); a scan's deviation from that mean, less its own smooth
  part (a Gaussian of ``SMOOTH_PART`` voxels within the brain, so that bias field and gain do not count),
  over the standard deviation (widened to the largest within one voxel for misregistration, floored at
  its median over the brain), smoothed by one voxel, both signs (``|z|``);
* **its control against healthy scans**, the two classic rules of neuroimaging inference. Peaks: a scan's
  statistic is its highest ``|z|``. Clusters: 26-connected clusters of ``|z| > u``, where ``u`` is the
  ``FORMING`` quantile of the healthy validation scans' brain voxels, a cluster's mass its sum of
  ``|z| - u``, a scan's statistic its largest mass. For each, the run's 20 healthy calibration scans give
  the critical value at level ``alpha``: the ``ceil((n + 1)(1 - alpha))``-th smallest of their
  statistics, so that a healthy scan of the training site goes above it with probability at most
  ``alpha`` (conformal; with 20 scans only ``alpha >= 1/21`` can flag at all). The voxels, or the
  clusters, above it are the channel's mask;
* **the flow**: the run's checkpoint and its ``calibration.json`` (the same calibration scans), whose
  FDR-``q`` mask flags a healthy scan with probability at most ``q``;
* **the unions** of the flow's FDR-0.05 mask with either channel mask at 0.05: a healthy scan is flagged
  by one with probability at most 0.1 (the two promises add), so they are compared with the flow at 0.1.

For each rule, on the run's test scans: the share of healthy scans flagged (any voxel), the share of
lesion scans with a flagged voxel on the lesion (overall and by family), lesions of at least 0.5 ml found
and false clusters per healthy scan (:func:`simpleslicenet.clusters.count_lesions`); and the volume AUROC
of the channel's two statistics and of the flow's hottest brain voxel, by family (the flow's must
reproduce the run's recorded volume AUROC, or the run is refused). The shifted site's runs keep the
training site's channel and calibration, as a new site's scans would meet them.

    python benchmarks/intensity_clusters.py benchmarks/results/protocol_calibrated --output docs/experiments/intensity_clusters.json

Prints a table per dataset (pooled over seeds) and writes the JSON (every run's counts).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

SMOOTH_PART = 9.0
FORMING = 0.999
ALPHA = 0.05
FLOW_RATES = (0.05, 0.1)
MIN_LESION_ML = 0.5
FAMILIES = ("tumour", "small", "multifocal", "hypointense")
RULES = ("flow FDR 0.05", "channel peaks 0.05", "channel clusters 0.05", "flow FDR 0.1", "flow 0.05 + peaks 0.05", "flow 0.05 + clusters 0.05")
SCORES = (("peak", "the channel's peak (highest absolute z)"), ("mass", "the channel's largest cluster mass"), ("flow", "the flow's hottest brain voxel"))


def _within(values: np.ndarray, brain: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing of ``values`` that only averages brain voxels (normalised convolution)."""
    weight = ndimage.gaussian_filter(brain.astype(np.float32), sigma)
    smooth = ndimage.gaussian_filter(np.where(brain, values, 0).astype(np.float32), sigma)
    return np.where(brain, smooth / np.maximum(weight, 1e-6), 0)


class IntensityNorm:
    """Mean and spread of the healthy training volumes' intensities at each location of the grid."""

    def __init__(self, images: list[np.ndarray], brains: list[np.ndarray]) -> None:
        from simpleslicenet.benchmark.scan_maps import location_statistics

        self.covered, self.mean, spread = location_statistics(images, brains)
        spread = ndimage.maximum_filter(spread, size=3)  # a voxel off in registration sees its neighbours' spread
        self.std = np.maximum(spread, float(np.median(spread[self.covered])))

    def channel(self, image: np.ndarray, brain: np.ndarray) -> np.ndarray:
        """``|z|`` of one scan (0 outside its brain and where the training brains do not reach)."""
        inside = brain & self.covered
        deviation = np.where(inside, image - self.mean, 0)
        z = (deviation - _within(deviation, inside, SMOOTH_PART)) / self.std
        return np.where(inside, np.abs(_within(z, inside, 1.0)), 0).astype(np.float32)


def cluster_masses(z: np.ndarray, u: float) -> tuple[np.ndarray, np.ndarray]:
    """The 26-connected clusters of ``z > u`` (labels) and each cluster's mass (sum of ``z - u``)."""
    from simpleslicenet.clusters import CONNECTIVITY

    labels, count = ndimage.label(z > u, structure=CONNECTIVITY)
    masses = ndimage.sum_labels(z - u, labels, np.arange(1, count + 1)) if count else np.zeros(0)
    return labels, np.asarray(masses, dtype=float)


def critical_mass(statistics: list[float], alpha: float) -> float:
    """The conformal critical value: a healthy scan's statistic exceeds it with probability at most ``alpha``."""
    rank = math.ceil((len(statistics) + 1) * (1 - alpha))
    return math.inf if rank > len(statistics) else float(sorted(statistics)[rank - 1])


def images_by_index(dataset) -> dict[int, np.ndarray]:  # noqa: ANN001
    """``{volume index: [D, H, W] intensities on the model grid}`` of every volume of a VolumeDataset."""
    return {int(batch.volume_index[0]): batch.image[:, 0].numpy() for batch in (dataset[i] for i in range(len(dataset)))}


def _count(flagged: np.ndarray, scan: dict, group: str, counts: dict) -> None:
    from simpleslicenet.clusters import count_lesions

    lesions, found, false_clusters = count_lesions(flagged, scan["lesion"], scan["voxel_ml"], MIN_LESION_ML)
    groups = ["healthy"] if group == "healthy" else ["lesion", group]
    for name in groups:
        hit = flagged.any() if name == "healthy" else flagged[scan["lesion"]].any()
        counts[f"scans {name}"][0] += int(hit)
        counts[f"scans {name}"][1] += 1
    counts["lesions"][0] += found
    counts["lesions"][1] += lesions
    if group == "healthy":
        counts["false clusters"][0] += false_clusters
        counts["false clusters"][1] += 1


def evaluate_run(record: Path) -> dict:
    """One run: the channel built and calibrated, every rule's counts on the test scans, the volume AUROCs."""
    from simpleslicenet.benchmark.scan_maps import retest_with_calibration
    from simpleslicenet.calibration import ConformalCalibration
    from simpleslicenet.metrics.breakdown import lesion_families
    from simpleslicenet.metrics.exact import exact_auroc

    spec = json.loads(record.read_text())
    maps, engine = retest_with_calibration(record)
    datamodule, family = engine.trainer.datamodule, lesion_families(engine.trainer)
    train = [datamodule.train_data[i] for i in range(len(datamodule.train_data))]
    norm = IntensityNorm([b.image[:, 0].numpy() for b in train], [b.brain_mask.numpy().astype(bool) for b in train])
    images = {split: images_by_index(getattr(datamodule, f"{split}_data")) for split in ("val", "calibration", "test")}

    def z(split: str, scan: dict) -> np.ndarray:
        return norm.channel(images[split][scan["index"]], scan["brain"])

    healthy_val = [z("val", s)[s["brain"]] for s in maps.scans["validation"] if s["label"] == 0]
    u = float(np.quantile(np.concatenate(healthy_val), FORMING))
    calibration = [z("calibration", s) for s in maps.scans["calibration"]]
    critical_peak = critical_mass([float(c.max()) for c in calibration], ALPHA)
    critical = critical_mass([float(cluster_masses(c, u)[1].max(initial=0.0)) for c in calibration], ALPHA)
    flow = ConformalCalibration.load(record.with_suffix("") / "calibration.json")

    counts: dict[str, dict] = {rule: defaultdict(lambda: [0, 0]) for rule in RULES}
    statistic: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))  # group: score: values
    for scan in maps.scans["test"]:
        group = family.get(scan["index"], "lesion") if scan["label"] else "healthy"
        channel = z("test", scan)
        labels, masses = cluster_masses(channel, u)
        peaks, clusters = channel > critical_peak, np.isin(labels, 1 + np.flatnonzero(masses > critical))
        fdr = {q: flow.fdr_mask(scan["map"], scan["brain"], q) for q in FLOW_RATES}
        flagged = {
            "flow FDR 0.05": fdr[0.05], "channel peaks 0.05": peaks, "channel clusters 0.05": clusters, "flow FDR 0.1": fdr[0.1],
            "flow 0.05 + peaks 0.05": fdr[0.05] | peaks, "flow 0.05 + clusters 0.05": fdr[0.05] | clusters,
        }  # fmt: skip
        for rule in RULES:
            _count(flagged[rule], scan, group, counts[rule])
        for name, value in (("peak", channel.max()), ("mass", masses.max(initial=0.0)), ("flow", scan["volume_score"])):
            statistic[group][name].append(float(value))

    def auroc(groups: list[str], name: str) -> float:
        lesion = [v for g in groups for v in statistic[g][name]]
        healthy = statistic["healthy"][name]
        return exact_auroc(torch.tensor(lesion + healthy), torch.tensor([True] * len(lesion) + [False] * len(healthy)))

    lesion_groups = [g for g in statistic if g != "healthy"]
    volume_auroc = {
        name: {"all": auroc(lesion_groups, name)} | {f: auroc([f], name) for f in FAMILIES if f in statistic}
        for name, _ in SCORES
    }
    if abs(volume_auroc["flow"]["all"] - spec["metrics"]["volume_AUROC"]) > 1e-9:
        msg = f"{record}: the flow's volume AUROC {volume_auroc['flow']['all']} does not reproduce the recorded {spec['metrics']['volume_AUROC']}"
        raise RuntimeError(msg)
    return {
        "run": record.stem, "dataset": spec["dataset"], "seed": spec["seed"],
        "forming_threshold": u, "critical_peak": critical_peak, "critical_mass": critical,
        "calibration_scans": len(maps.scans["calibration"]),
        "counts": {rule: dict(c) for rule, c in counts.items()}, "volume_auroc": volume_auroc,
    }  # fmt: skip


def table(runs: list[dict], dataset: str) -> str:
    """Markdown: one row per rule, counts pooled over the dataset's seeds."""
    chosen = [run for run in runs if run["dataset"] == dataset]
    columns = ["scans healthy", "scans lesion", *(f"scans {f}" for f in FAMILIES), "lesions", "false clusters"]
    names = ["healthy scans flagged", "lesion scans found", *FAMILIES, f"lesions ≥ {MIN_LESION_ML} ml found", "false clusters / healthy scan"]
    lines = [f"| rule ({dataset}) | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for rule in RULES:
        cells = []
        for column in columns:
            hits = sum(run["counts"][rule].get(column, [0, 0])[0] for run in chosen)
            n = sum(run["counts"][rule].get(column, [0, 0])[1] for run in chosen)
            cells.append(f"{hits / n:.2f} ({hits}/{n})" if n and column != "false clusters" else f"{hits / n:.2f}" if n else "–")
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    groups = ["all", *FAMILIES]
    lines += ["", f"| scan score ({dataset}), volume AUROC (mean over seeds) | " + " | ".join(groups) + " |", "|---" * (len(groups) + 1) + "|"]
    for name, title in SCORES:
        values = [[run["volume_auroc"][name][g] for run in chosen if g in run["volume_auroc"][name]] for g in groups]
        lines.append(f"| {title} | " + " | ".join(f"{np.mean(v):.3f}" if v else "–" for v in values) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    from simpleslicenet.benchmark.single_run import retest_parser, run_records, write_report
    from simpleslicenet.quiet import quiet_lightning_messages

    args = retest_parser(__doc__.splitlines()[0], "intensity_clusters", "a sweep's output folder whose runs hold calibration scans").parse_args(argv)
    quiet_lightning_messages()
    runs = [evaluate_run(record) for record in run_records(args.sweep, model=args.model)]
    report = {
        "sweep": args.sweep.name, "model": args.model, "smooth_part_voxels": SMOOTH_PART, "forming_quantile": FORMING,
        "alpha": ALPHA, "min_lesion_ml": MIN_LESION_ML, "runs": runs,
    }  # fmt: skip
    return write_report(report, args.output, [table(runs, dataset) for dataset in dict.fromkeys(run["dataset"] for run in runs)])


if __name__ == "__main__":
    main()
