"""Lesions found at the validation threshold or at a false discovery rate, counted from several lesion sizes up.

A sweep's tables count the lesions of at least 1 ml (``lesion_detection``). This script tests a finished
sweep's runs again (their checkpoints, e.g. ``configs/benchmark/protocol.yaml``'s) on their own dataset
and seed, flags every test map's voxels at the run's recorded validation threshold (or, with ``--fdr
q``, the voxels its saved calibration flags at false discovery rate ``q``: runs of a sweep with
calibration scans, e.g. ``protocol_calibrated.yaml``), and counts, for each smallest size, the lesions
with a flagged voxel on them, by lesion family, and the false-positive clusters per healthy scan
(:func:`simpleslicenet.clusters.count_lesions`, the sweep's own rule). The 1-ml count must reproduce
the recorded ``lesion_detection`` (``fdr<q>_lesion_detection``), and the false clusters the recorded
``lesion_FPclusters`` (``fdr<q>_FPclusters``), or the run is refused.

    python benchmarks/lesions_found.py benchmarks/results/protocol --model SimpleSliceNet \\
        --output docs/experiments/lesions_found.json
    python benchmarks/lesions_found.py benchmarks/results/protocol_calibrated --fdr 0.1 \\
        --output docs/experiments/lesions_found_fdr10.json

Prints a table per dataset (shares pooled over each run's lesions, then mean ± std over the seeds) and
writes the JSON (every run's counts).
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np

MIN_ML = (0.5, 1.0)
FAMILIES = ("tumour", "small", "multifocal", "hypointense")


def scan_counts(flagged: np.ndarray, scan: dict, min_ml: tuple[float, ...]) -> dict:
    """One test scan's lesions (``[lesions, found]`` for each smallest size) and false clusters."""
    from simpleslicenet.clusters import count_lesions

    counts = {str(ml): count_lesions(flagged, scan["lesion"], scan["voxel_ml"], ml) for ml in min_ml}
    false_clusters = next(iter(counts.values()))[2]  # the same at every size
    lesions = {ml: [total, found] for ml, (total, found, _) in counts.items()}
    return {"index": scan["index"], "healthy": not scan["lesion"].any(), "false_clusters": false_clusters, "lesions": lesions}


def evaluate_run(record: Path, min_ml: tuple[float, ...], fdr: float | None = None) -> dict:
    """Test one run's checkpoint again; its lesions found for each smallest size, by family.

    Flagged at the validation threshold, or at false discovery rate ``fdr`` with the run's calibration.
    """
    from simpleslicenet.benchmark.scan_maps import ScanMaps
    from simpleslicenet.benchmark.single_run import retest_run
    from simpleslicenet.calibration import ConformalCalibration
    from simpleslicenet.metrics.breakdown import lesion_families

    result = json.loads(record.read_text())
    flag: Callable[[np.ndarray, np.ndarray], np.ndarray]  # a scan's map and brain -> its flagged voxels
    if fdr is None:
        threshold = float(result["val_threshold"])
        rule = {"threshold": threshold}
        recorded = result["metrics"]
        detection, false_key = "lesion_detection", "lesion_FPclusters"
        flag = lambda amap, brain: amap >= threshold  # noqa: E731
    else:
        calibration = ConformalCalibration.load(record.with_suffix("") / "calibration.json")
        rule = {"fdr": fdr, "fdr_level": calibration.fdr_level(fdr)}
        recorded, tag = result["calibrated"], f"fdr{round(fdr * 100):02d}"
        detection, false_key = f"{tag}_lesion_detection", f"{tag}_FPclusters"
        flag = lambda amap, brain: calibration.fdr_mask(amap, brain, fdr)  # noqa: E731
    maps = ScanMaps()
    engine = retest_run(record, [maps])
    family = lesion_families(engine.trainer)
    scans = [scan_counts(flag(s["map"], s["brain"]) & s["brain"], s, min_ml) for s in maps.scans["test"]]
    found: dict[str, dict[str, list[int]]] = {}
    for ml in map(str, min_ml):
        groups = {"all": scans} | {f: [s for s in scans if family.get(s["index"]) == f] for f in FAMILIES}
        found[ml] = {group: [sum(s["lesions"][ml][i] for s in chosen) for i in (1, 0)] for group, chosen in groups.items()}
    healthy = [s["false_clusters"] for s in scans if s["healthy"]]
    false_clusters = sum(healthy) / len(healthy)
    if "1.0" in found and abs(found["1.0"]["all"][0] / found["1.0"]["all"][1] - recorded[detection]) > 1e-9:
        msg = f"{record}: lesions of 1 ml found do not reproduce the recorded {detection}"
        raise RuntimeError(msg)
    if abs(false_clusters - recorded[false_key]) > 1e-9:
        msg = f"{record}: false clusters do not reproduce the recorded {false_key}"
        raise RuntimeError(msg)
    return {
        "run": record.stem,
        "dataset": result["dataset"],
        "seed": result["seed"],
        **rule,
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
    from simpleslicenet.benchmark.single_run import retest_parser, run_records, write_report
    from simpleslicenet.quiet import quiet_lightning_messages

    parser = retest_parser(__doc__.splitlines()[0], "lesions_found")
    parser.add_argument("--min-ml", type=float, nargs="+", default=list(MIN_ML), help="smallest lesion sizes counted")
    parser.add_argument("--fdr", type=float, default=None, help="flag at this false discovery rate (the runs' calibration), not the validation threshold")
    args = parser.parse_args(argv)
    quiet_lightning_messages()
    min_ml = tuple(args.min_ml)
    runs = [evaluate_run(record, min_ml, args.fdr) for record in run_records(args.sweep, model=args.model)]
    report = {"sweep": args.sweep.name, "model": args.model, "min_ml": min_ml, "fdr": args.fdr, "runs": runs}
    return write_report(report, args.output, [table(runs, dataset, min_ml) for dataset in dict.fromkeys(run["dataset"] for run in runs)])


if __name__ == "__main__":
    main()
