"""Scan-level scores from the same maps: the hottest voxel against scores that count extended and multifocal evidence.

Takes the runs of a finished sweep (their checkpoints, e.g. ``configs/benchmark/protocol.yaml``'s), tests
each model again on its own dataset and seed, and scores every test scan from its brain-restricted map
in several ways:

* ``max``: the hottest brain voxel (the models' volume score; checked against the recorded one);
* ``top 0.1%``: the mean of the hottest 0.1% of the brain's voxels;
* cluster scores at a cluster-forming threshold ``u``, the ``q`` quantile of the healthy validation
  scans' brain voxels (the training site's, pooled; no lesion label is used): the suprathreshold mass of
  the whole brain (sum of ``score - u`` over voxels above ``u``), the mass and the extent of the largest
  cluster, and the number of clusters of at least 0.1 ml (26-connected, :mod:`simpleslicenet.clusters`).

For each score: volume AUROC over all test scans and for each lesion family against the healthy scans,
mean ± std over the sweep's seeds, per dataset; and for each family, in how many lesion scans the
hottest brain voxel lies on the lesion (where it never does, no score of the map can find the scans).

    python benchmarks/scan_scores.py benchmarks/results/protocol --output docs/experiments/scan_scores.json

Prints a table per dataset and writes the JSON (every run's figures).
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

QUANTILES = (0.99, 0.999)
MIN_CLUSTER_ML = 0.1
FAMILIES = ("tumour", "small", "multifocal", "hypointense")


def scan_scores(scores: np.ndarray, brain: np.ndarray, voxel_ml: float, thresholds: dict[float, float]) -> dict[str, float]:
    """Every score of one scan from its map ``scores`` and brain mask ``brain`` (``[D, H, W]``)."""
    from simpleslicenet.clusters import CONNECTIVITY

    inside = np.sort(scores[brain])
    result = {"max": float(inside[-1]), "top 0.1%": float(inside[-max(1, round(inside.size * 0.001)) :].mean())}
    for q, u in thresholds.items():
        above = brain & (scores > u)
        excess = np.where(above, scores - u, 0.0)
        clusters, count = ndimage.label(above, structure=CONNECTIVITY)
        index = np.arange(1, count + 1)
        masses = ndimage.sum_labels(excess, clusters, index) if count else np.zeros(1)
        sizes = np.bincount(clusters.ravel(), minlength=count + 1)[1:] * voxel_ml if count else np.zeros(1)
        result[f"brain mass, u = q{q}"] = float(excess.sum())
        result[f"largest cluster mass, u = q{q}"] = float(masses.max())
        result[f"largest cluster ml, u = q{q}"] = float(sizes.max())
        result[f"clusters >= {MIN_CLUSTER_ML} ml, u = q{q}"] = float((sizes >= MIN_CLUSTER_ML).sum())
    return result


def evaluate_run(record: Path) -> dict:
    """Test one run's checkpoint again and return each score's volume AUROC, overall and by family."""
    from simpleslicenet.benchmark.scan_maps import ScanMaps
    from simpleslicenet.benchmark.single_run import retest_run
    from simpleslicenet.metrics.breakdown import lesion_families
    from simpleslicenet.metrics.exact import exact_auroc

    spec = json.loads(record.read_text())
    collector = ScanMaps()
    engine = retest_run(record, [collector], validate=True)
    family = lesion_families(engine.trainer)
    # The cluster-forming thresholds: quantiles of the healthy validation scans' brain voxels, pooled.
    healthy = np.concatenate([s["map"][s["brain"]] for s in collector.scans["validation"] if s["label"] == 0])
    thresholds = {q: float(np.quantile(healthy, q)) for q in QUANTILES}
    scans = []
    for scan in collector.scans["test"]:
        amap, brain, lesion = scan["map"], scan["brain"], scan["lesion"]
        # Whether the map holds the lesion at all: its hottest brain voxel lies on the lesion.
        on_lesion = bool(lesion.any()) and bool(amap[lesion].max() >= amap[brain].max())
        scans.append({
            "index": scan["index"], "label": scan["label"], "recorded": scan["volume_score"], "on_lesion": on_lesion,
            **scan_scores(amap, brain, scan["voxel_ml"], thresholds), "family": family.get(scan["index"], "healthy"),
        })  # fmt: skip
    if any(abs(scan["max"] - scan["recorded"]) > 1e-5 for scan in scans):
        msg = f"{record}: the hottest brain voxel is not the recorded volume score"
        raise RuntimeError(msg)
    names = [name for name in scans[0] if name not in {"index", "label", "recorded", "on_lesion", "family"}]
    auroc: dict[str, dict[str, float]] = {}
    for name in names:
        groups = {"all": scans} | {f: [s for s in scans if s["family"] in {"healthy", f}] for f in FAMILIES}
        auroc[name] = {
            group: exact_auroc(torch.tensor([s[name] for s in chosen]), torch.tensor([s["label"] for s in chosen]))
            for group, chosen in groups.items()
        }
    hottest_on_lesion = {f: [s["on_lesion"] for s in scans if s["family"] == f] for f in FAMILIES}
    return {
        "run": record.stem,
        "dataset": spec["dataset"],
        "seed": spec["seed"],
        "thresholds": thresholds,
        "volume_auroc": auroc,
        "hottest_voxel_on_lesion": {f: [sum(flags), len(flags)] for f, flags in hottest_on_lesion.items()},
    }


def table(runs: list[dict], dataset: str) -> str:
    """Markdown: each score's volume AUROC, mean ± std over the dataset's seeds."""
    chosen = [run for run in runs if run["dataset"] == dataset]
    columns = ["all", *FAMILIES]
    lines = [f"| scan score ({dataset}) | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in chosen:
        for name, groups in run["volume_auroc"].items():
            for group, value in groups.items():
                values[name][group].append(value)
    for name, groups in values.items():
        cells = [f"{statistics.mean(groups[c]):.3f} ± {statistics.stdev(groups[c]):.3f}" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    counts = [[sum(run["hottest_voxel_on_lesion"][f][i] for run in chosen) for i in (0, 1)] for f in FAMILIES]
    lines.append("| hottest brain voxel on the lesion (scans) | | " + " | ".join(f"{hit} of {n}" for hit, n in counts) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    from simpleslicenet.benchmark.single_run import retest_parser, run_records, write_report
    from simpleslicenet.quiet import quiet_lightning_messages

    args = retest_parser(__doc__.splitlines()[0], "scan_scores").parse_args(argv)
    quiet_lightning_messages()
    runs = [evaluate_run(record) for record in run_records(args.sweep, model=args.model)]
    report = {"sweep": args.sweep.name, "model": args.model, "quantiles": QUANTILES, "min_cluster_ml": MIN_CLUSTER_ML, "runs": runs}
    return write_report(report, args.output, [table(runs, dataset) for dataset in dict.fromkeys(run["dataset"] for run in runs)])


if __name__ == "__main__":
    main()
