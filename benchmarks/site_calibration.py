"""How many healthy scans a new site needs for label-free masks that keep their promise there.

Takes the shifted-site runs of ``configs/benchmark/protocol_calibrated.yaml`` (their checkpoints and
their training site's ``calibration.json``), tests each model again on the shifted site's scans (every
subject that site generates: 100 healthy and 24 lesion scans a seed), and compares:

* the training site's calibration (what the sweep reports: the model's calibration never refitted);
* a calibration of the new site's own: ``k`` of its healthy scans drawn at random (``--draws`` draws for
  each ``k`` of ``--sizes``), the remaining healthy scans and every lesion scan tested against it.

For each, at FDR 0.05 and 0.1: the share of healthy test scans with any flagged voxel (the promise: at
most ``q``, pooled over draws and seeds, with its binomial standard error) and the share of lesion
scans with a flagged voxel on the lesion, overall and by lesion family.

    python benchmarks/site_calibration.py benchmarks/results/protocol_calibrated --output docs/experiments/site_calibration.json

Prints the table and writes the JSON (every seed's counts).
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

RATES = (0.05, 0.1)
SIZES = (19, 29, 49)
FAMILIES = ("tumour", "small", "multifocal", "hypointense")


def flags(calibration, scan: dict, q: float) -> tuple[bool, bool]:  # noqa: ANN001
    """``(any voxel flagged, a lesion voxel flagged)`` at FDR ``q``, as ``calibration.fdr_mask`` decides.

    p-values fall as scores rise, so the scores sorted from the highest give the p-values already in
    increasing order: Benjamini–Hochberg needs no sort of its own for each calibration drawn.
    """
    from simpleslicenet.calibration import benjamini_hochberg_cutoff

    cutoff = benjamini_hochberg_cutoff(calibration.voxel_pvalues(scan["scores"]), calibration.fdr_level(q))
    if cutoff is None:
        return False, False
    on_lesion = scan["lesion_max"] is not None and float(calibration.voxel_pvalues(np.array([scan["lesion_max"]]))[0]) <= cutoff
    return True, on_lesion


def count(calibration, scans: list[dict], q: float) -> dict[str, list[int]]:  # noqa: ANN001
    """``[flagged or found, scans]`` for the healthy scans, all lesion scans and each family."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for scan in scans:
        flagged, found = flags(calibration, scan, q)
        groups = ["healthy"] if scan["family"] == "healthy" else ["lesion", scan["family"]]
        for group in groups:
            counts[group][0] += int(flagged if group == "healthy" else found)
            counts[group][1] += 1
    return dict(counts)


def evaluate_run(record: Path, sizes: tuple[int, ...], draws: int) -> dict:
    """The run's counts with the training site's calibration and with ``k`` new-site scans, per ``q``."""
    from simpleslicenet.benchmark.scan_maps import ScanMaps
    from simpleslicenet.benchmark.single_run import retest_run
    from simpleslicenet.calibration import ConformalCalibration
    from simpleslicenet.metrics.breakdown import lesion_families

    spec = json.loads(record.read_text())
    collector = ScanMaps()
    engine = retest_run(record, [collector])
    family = lesion_families(engine.trainer)
    scans = collector.scans["test"]
    for scan in scans:
        scan["family"] = family.get(scan["index"], "healthy")
        # Brain-voxel scores highest first, and the hottest lesion voxel: all that `flags` reads.
        scan["scores"] = -np.sort(-scan["map"][scan["brain"]].astype(np.float64))
        scan["lesion_max"] = float(scan["map"][scan["lesion"]].max()) if scan["lesion"].any() else None
    training_site = ConformalCalibration.load(record.with_suffix("") / "calibration.json")
    # The shortcut in `flags` must make the package's masks: checked on every scan of the run.
    for scan in scans:
        mask = training_site.fdr_mask(scan["map"], scan["brain"], RATES[0])
        if flags(training_site, scan, RATES[0]) != (bool(mask.any()), bool(mask[scan["lesion"]].any())):
            msg = f"{record}: the sorted-score masks disagree with ConformalCalibration.fdr_mask"
            raise RuntimeError(msg)
        del scan["map"], scan["brain"], scan["lesion"]  # the sorted scores are all that is kept
    healthy = [scan for scan in scans if scan["family"] == "healthy"]
    lesions = [scan for scan in scans if scan["family"] != "healthy"]
    result = {"run": record.stem, "seed": spec["seed"], "healthy_scans": len(healthy), "lesion_scans": len(lesions)}
    result["training_site"] = {str(q): count(training_site, scans, q) for q in RATES}
    rng = np.random.default_rng(spec["seed"])
    for k in sizes:
        totals = {str(q): defaultdict(lambda: [0, 0]) for q in RATES}
        for _ in range(draws):
            chosen = set(rng.choice(len(healthy), size=k, replace=False).tolist())
            calibration = ConformalCalibration.from_scores(
                [healthy[i]["scores"] for i in chosen], [healthy[i]["volume_score"] for i in chosen]
            )
            tested = [scan for i, scan in enumerate(healthy) if i not in chosen] + lesions
            for q in RATES:
                for group, (hits, n) in count(calibration, tested, q).items():
                    totals[str(q)][group][0] += hits
                    totals[str(q)][group][1] += n
        result[f"new_site_{k}"] = {q: dict(groups) for q, groups in totals.items()}
    return result


def pooled(runs: list[dict], key: str, q: str, group: str) -> tuple[float, float]:
    """Share pooled over the runs and its binomial standard error."""
    hits = sum(run[key][q].get(group, [0, 0])[0] for run in runs)
    n = sum(run[key][q].get(group, [0, 0])[1] for run in runs)
    share = hits / n if n else math.nan
    return share, math.sqrt(share * (1 - share) / n) if n else math.nan


def table(runs: list[dict], sizes: tuple[int, ...], draws: int) -> str:
    """Markdown: one row per calibration, pooled over seeds (and draws)."""
    header = ["calibration", *(f"healthy flagged @ {q}" for q in RATES), *(f"lesion scans found @ {q}" for q in RATES), *(f"{f} @ 0.05" for f in FAMILIES)]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    keys = [("training_site", "training site's (20 scans)")] + [(f"new_site_{k}", f"new site's own, {k} scans ({draws} draws)") for k in sizes]
    for key, name in keys:
        cells = [name]
        cells += [f"{s:.3f} ± {e:.3f}" for s, e in (pooled(runs, key, str(q), "healthy") for q in RATES)]
        cells += [f"{pooled(runs, key, str(q), 'lesion')[0]:.2f}" for q in RATES]
        cells += [f"{pooled(runs, key, '0.05', f)[0]:.2f}" for f in FAMILIES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="protocol_calibrated's output folder (its runs/ hold the checkpoints)")
    parser.add_argument("--dataset", default="shifted_site", help="the runs' dataset: the new site")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="new-site calibration scans")
    parser.add_argument("--draws", type=int, default=50, help="random calibration draws for each size")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/site_calibration.json"))
    args = parser.parse_args(argv)
    from simpleslicenet.benchmark.single_run import run_records, write_report
    from simpleslicenet.quiet import quiet_lightning_messages

    quiet_lightning_messages()
    sizes = tuple(args.sizes)
    runs = [evaluate_run(record, sizes, args.draws) for record in run_records(args.sweep, dataset=args.dataset)]
    report = {"sweep": args.sweep.name, "dataset": args.dataset, "rates": RATES, "sizes": sizes, "draws": args.draws, "runs": runs}
    return write_report(report, args.output, [table(runs, sizes, args.draws)])


if __name__ == "__main__":
    main()
