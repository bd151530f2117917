"""Lesions found at the validation threshold, counted from several lesion sizes up.

A sweep's tables count the lesions of at least 1 ml (``lesion_detection``). This script tests a finished
sweep's runs again (their checkpoints, e.g. ``configs/benchmark/protocol.yaml``'s) on their own dataset
and seed, thresholds every test map at the run's recorded validation threshold, and counts, for each
smallest size, the lesions with a flagged voxel on them, by lesion family, and the false-positive
clusters per healthy scan (:func:`simpleslicenet.clusters.count_lesions`, the sweep's own rule). The
1-ml count must reproduce the recorded ``lesion_detection``, and the false clusters the recorded
``lesion_FPclusters``, or the run is refused.

    python benchmarks/lesions_found.py benchmarks/results/protocol --model SimpleSliceNet \\
        --output docs/experiments/lesions_found.json

Prints a table per dataset (shares pooled over each run's lesions, then mean ± std over the seeds) and
writes the JSON (every run's counts).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from lightning.pytorch import Callback

MIN_ML = (0.5, 1.0)
FAMILIES = ("tumour", "small", "multifocal", "hypointense")


class LesionCounts(Callback):
    """Every test scan's lesions and false clusters at a fixed threshold, for each smallest size."""

    def __init__(self, threshold: float, min_ml: tuple[float, ...]) -> None:
        self.threshold = threshold
        self.min_ml = min_ml
        self.scans: list[dict] = []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001, D102
        from simpleslicenet.clusters import count_lesions

        for index, rows in outputs.volumes():
            part = outputs.rows(rows)
            brain = part.brain_mask.numpy().astype(bool)
            flagged = (part.anomaly_map.squeeze(1).numpy() >= self.threshold) & brain
            lesion = part.gt_mask.numpy().astype(bool) & brain
            counts = {str(ml): count_lesions(flagged, lesion, part.geometry[0].voxel_ml, ml) for ml in self.min_ml}
            false_clusters = next(iter(counts.values()))[2]  # the same at every size
            lesions = {ml: [total, found] for ml, (total, found, _) in counts.items()}
            self.scans.append({"index": index, "healthy": not lesion.any(), "false_clusters": false_clusters, "lesions": lesions})


def evaluate_run(record: Path, min_ml: tuple[float, ...]) -> dict:
    """Test one run's checkpoint again; its lesions found for each smallest size, by family."""
    from simpleslicenet.benchmark.single_run import retest_run
    from simpleslicenet.metrics.breakdown import lesion_families

    result = json.loads(record.read_text())
    counter = LesionCounts(float(result["val_threshold"]), min_ml)
    engine = retest_run(record, [counter])
    family = lesion_families(engine.trainer)
    found: dict[str, dict[str, list[int]]] = {}
    for ml in map(str, min_ml):
        groups = {"all": counter.scans} | {f: [s for s in counter.scans if family.get(s["index"]) == f] for f in FAMILIES}
        found[ml] = {group: [sum(s["lesions"][ml][i] for s in scans) for i in (1, 0)] for group, scans in groups.items()}
    healthy = [s["false_clusters"] for s in counter.scans if s["healthy"]]
    false_clusters = sum(healthy) / len(healthy)
    recorded = result["metrics"]
    if "1.0" in found and abs(found["1.0"]["all"][0] / found["1.0"]["all"][1] - recorded["lesion_detection"]) > 1e-9:
        msg = f"{record}: lesions of 1 ml found do not reproduce the recorded lesion_detection"
        raise RuntimeError(msg)
    if abs(false_clusters - recorded["lesion_FPclusters"]) > 1e-9:
        msg = f"{record}: false clusters do not reproduce the recorded lesion_FPclusters"
        raise RuntimeError(msg)
    return {
        "run": record.stem,
        "dataset": result["dataset"],
        "seed": result["seed"],
        "threshold": counter.threshold,
        "found": found,  # smallest size -> group -> [found, lesions]
        "false_clusters_per_healthy_scan": false_clusters,
    }


def _share(counts: list[int]) -> float:
    return counts[0] / counts[1] if counts[1] else math.nan


def table(runs: list[dict], dataset: str, min_ml: tuple[float, ...]) -> str:
    """Markdown: lesions found from each smallest size (all and by family) and false clusters, over seeds."""
    chosen = [run for run in runs if run["dataset"] == dataset]
    columns = ["all", *FAMILIES]
    lines = [f"| lesions found ({dataset}) | " + " | ".join(columns) + " | lesions | false clusters / healthy scan |"]
    lines.append("|---" * (len(columns) + 3) + "|")
    false_clusters = [run["false_clusters_per_healthy_scan"] for run in chosen]
    for ml in map(str, min_ml):
        values: dict[str, list[float]] = defaultdict(list)
        for run in chosen:
            for group in columns:
                if not math.isnan(share := _share(run["found"][ml][group])):
                    values[group].append(share)
        cells = [_mean_std(values[c]) for c in columns]
        total = sum(run["found"][ml]["all"][1] for run in chosen)
        lines.append(f"| ≥ {ml} ml | " + " | ".join(cells) + f" | {total} | {_mean_std(false_clusters)} |")
    return "\n".join(lines)


def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {spread:.2f}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="a sweep's output folder (its runs/ hold the checkpoints)")
    parser.add_argument("--model", default="SimpleSliceNet", help="the runs' model label")
    parser.add_argument("--min-ml", type=float, nargs="+", default=list(MIN_ML), help="smallest lesion sizes counted")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/lesions_found.json"))
    args = parser.parse_args(argv)
    from simpleslicenet.benchmark.single_run import run_records
    from simpleslicenet.quiet import quiet_lightning_messages

    quiet_lightning_messages()
    min_ml = tuple(args.min_ml)
    runs = [evaluate_run(record, min_ml) for record in run_records(args.sweep, model=args.model)]
    report = {"sweep": args.sweep.name, "model": args.model, "min_ml": min_ml, "runs": runs}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    for dataset in dict.fromkeys(run["dataset"] for run in runs):
        print(table(runs, dataset, min_ml), end="\n\n")
    print(f"wrote {args.output}")
    return report


if __name__ == "__main__":
    main()
