"""The BIDS workflow end to end on a phantom BIDS dataset, as the user guide's commands run it, timed step by step.

phantom (BIDS) → validate → preprocess into derivatives → train on the controls → export → calibrate on the
reference controls → ``simpleslicenet bids ... participant`` → ``... group`` → validate the derivatives →
open every report page in headless Chromium (console errors, pictures, load time, size).

Prints a table of the steps (wall, user and system time of each command) and of the pages, the volume
p-values of patients against held-out controls, and writes everything to a JSON file. With
``--screenshots DIR`` it keeps a screenshot of the group page and of the most suspicious subject's page.

    python benchmarks/bids_workflow.py --work results/bids_workflow --output benchmarks/results/bids_workflow.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from simpleslicenet.data.datamodules import BIDS
from simpleslicenet.reports.browser import headless_chromium, open_page

CONFIG = "configs/model/simpleslicenet_phantom.yaml"
PREPROCESSED = "simpleslicenet-preprocess"


def shown(command: list[str], work: Path) -> str:
    """A command as the user guide writes it: the program by its name, paths relative to the working folder."""
    return shlex.join([Path(command[0]).name, *(part.replace(f"{work}{os.sep}", "") for part in command[1:])])


def run_step(name: str, command: list[str], steps: list[dict], work: Path) -> str:
    """Run one command, its output to the console; record wall, user and system seconds."""
    print(f"\n$ {shown(command, work)}", flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    completed = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(completed.stdout[-3000:], flush=True)
    steps.append({
        "step": name, "command": shown(command, work), "exit": completed.returncode, "wall_s": round(wall, 1),
        "user_s": round(after.ru_utime - before.ru_utime, 1), "system_s": round(after.ru_stime - before.ru_stime, 1),
    })  # fmt: skip
    if completed.returncode != 0 and name not in {"validate raw", "validate derivatives"}:
        sys.exit(f"{name} failed with exit status {completed.returncode}")
    return completed.stdout


def validator_errors(output: str) -> dict:
    """Errors and warnings of a ``bids-validator-deno --json`` run, derivatives included."""
    document = json.loads(output[output.index("{"):])
    counts = {"errors": 0, "warnings": 0, "error_codes": set()}

    def add(issues: list[dict]) -> None:
        for issue in issues:
            kind = "errors" if issue.get("severity") == "error" else "warnings"
            counts[kind] += 1
            if kind == "errors":
                counts["error_codes"].add(issue.get("code"))

    add(document["issues"]["issues"])
    for derivative in document.get("derivativesSummary", {}).values():
        add(derivative["issues"]["issues"])
    counts["error_codes"] = sorted(counts["error_codes"])
    return counts


def auroc(positives: list[float], negatives: list[float]) -> float:
    """Probability that a positive scores above a negative (ties count half)."""
    pos, neg = np.asarray(positives)[:, None], np.asarray(negatives)[None, :]
    return float(((pos > neg) + 0.5 * (pos == neg)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("results/bids_workflow"), help="working folder (replaced)")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/bids_workflow.json"))
    parser.add_argument("--controls", type=int, default=24, help="healthy participants to train (and test) on")
    parser.add_argument("--reference", type=int, default=20, help="healthy participants held out for calibration")
    parser.add_argument("--patients", type=int, default=16)
    parser.add_argument("--spacing", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="worker processes of the participant level")
    parser.add_argument("--screenshots", type=Path, default=None, help="folder for the two screenshots")
    args = parser.parse_args()

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    work = args.work.resolve()
    bids, out = work / "bids", work / "bids" / "derivatives" / "simpleslicenet"
    bin_dir = Path(sys.executable).parent  # the commands of this environment, as the user guide runs them
    tool, anomalib, validator = (str(bin_dir / name) for name in ("simpleslicenet", "anomalib", "bids-validator-deno"))
    tool = [tool]
    steps: list[dict] = []

    run_step("phantom", [*tool, "phantom", "--bids", "--out", str(bids), "--healthy", str(args.controls),
                         "--reference", str(args.reference), "--lesion", str(args.patients),
                         "--spacing", f"{args.spacing:g}", "--seed", str(args.seed)], steps, work)  # fmt: skip
    raw_check = validator_errors(run_step("validate raw", [validator, str(bids), "--json"], steps, work))
    run_step("preprocess", [*tool, "preprocess", str(bids), "--skull-stripped", "--no-registration", "--spacing", f"{args.spacing:g}",
                            "--no-bias-correction", "--no-progress"], steps, work)  # fmt: skip
    train_root = work / "train"
    run_step("train", [anomalib, "train", "--config", CONFIG, "--data", "BIDS", "--data.root", str(bids),
                       "--data.derivatives", PREPROCESSED, "--data.healthy", "group=control",
                       "--data.target_shape", "[96,104,48]", "--data.seed", str(args.seed), "--default_root_dir", str(train_root),
                       "--seed_everything", str(args.seed)], steps, work)  # fmt: skip
    checkpoint = next(train_root.rglob("weights/lightning/model.ckpt"))
    run_step("export", [anomalib, "export", "--config", CONFIG, "--export_type", "openvino",
                        "--ckpt_path", str(checkpoint), "--default_root_dir", str(train_root)], steps, work)  # fmt: skip
    model = next(train_root.rglob("weights/openvino/model.xml"))
    calibration = work / "calibration.json"
    run_step("calibrate", [*tool, "calibrate", "--model", str(model), "--input", str(bids),
                           "--participants", "group=reference", "--derivatives", PREPROCESSED,
                           "--output", str(calibration)], steps, work)  # fmt: skip
    run_step("bids participant", [*tool, "bids", str(bids), str(out), "participant", "--model", str(model),
                                  "--calibration", str(calibration), "--fdr", "0.05", "--derivatives", PREPROCESSED,
                                  "--participants", "group=control,patient", "--workers", str(args.workers),
                                  "--no-progress"], steps, work)  # fmt: skip
    run_step("bids group", [*tool, "bids", str(bids), str(out), "group"], steps, work)
    derivatives_check = validator_errors(run_step("validate derivatives", [validator, str(out), "--json"], steps, work))

    with (out / "group_scores.tsv").open() as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    # The controls the model trained on are no test of it: compare the patients with the held-out controls.
    samples = BIDS(root=bids, derivatives=PREPROCESSED, healthy="group=control", seed=args.seed).split_samples()
    trained = set(samples.loc[samples["split"] == "train", "volume_id"])
    patient_p = [float(r["volume_pvalue"]) for r in rows if r["group"] == "patient" and r["volume_pvalue"]]
    control_p = [float(r["volume_pvalue"]) for r in rows
                 if r["group"] == "control" and r["volume_pvalue"] and r["scan"] not in trained]  # fmt: skip
    detection = {
        "patients": len(patient_p), "held_out_controls": len(control_p),
        "patients_p_below_0.05": sum(p < 0.05 for p in patient_p),
        "controls_p_below_0.05": sum(p < 0.05 for p in control_p),
        "auroc_patients_vs_controls_by_pvalue": round(auroc([-p for p in patient_p], [-p for p in control_p]), 3),
    }  # fmt: skip

    pages = sorted(out.rglob("*.html"))
    driver = headless_chromium()
    try:
        loads = {}
        for page in pages:
            loaded = open_page(driver, page)
            loads[str(page.relative_to(out))] = {
                "bytes": loaded.size_bytes, "load_ms": round(loaded.load_ms, 1), "console_errors": len(loaded.errors),
                "images": len(loaded.images), "undecoded": len(loaded.undecoded),
            }  # fmt: skip
        if args.screenshots:
            args.screenshots.mkdir(parents=True, exist_ok=True)
            open_page(driver, out / "group_report.html")
            driver.save_screenshot(str(args.screenshots / "bids_group_report.png"))
            top = rows[0]
            subject_page = next(p for p in pages if p.name.startswith(top["scan"]))
            driver.set_window_size(1200, 1700)
            open_page(driver, subject_page)
            driver.save_screenshot(str(args.screenshots / "bids_subject_report.png"))
    finally:
        driver.quit()

    subject_pages = {k: v for k, v in loads.items() if k != "group_report.html"}
    sizes = [v["bytes"] for v in subject_pages.values()]
    times = [v["load_ms"] for v in subject_pages.values()]
    print("\n| step | wall s | user s | system s | exit |\n|---|---|---|---|---|")
    for step in steps:
        print(f"| {step['step']} | {step['wall_s']} | {step['user_s']} | {step['system_s']} | {step['exit']} |")
    print(f"\nvalidator, raw dataset: {raw_check}\nvalidator, derivatives: {derivatives_check}")
    print(f"subject pages: {len(sizes)}, size max {max(sizes) / 1e6:.2f} MB (median {np.median(sizes) / 1e6:.2f}), "
          f"Chromium load max {max(times):.0f} ms (median {np.median(times):.0f}); "
          f"console errors {sum(v['console_errors'] for v in loads.values())}, "
          f"undecoded pictures {sum(v['undecoded'] for v in loads.values())}")  # fmt: skip
    print(f"group page: {loads['group_report.html']}")
    print(f"volume p-values: {detection}")
    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "arguments": {key: getattr(args, key) for key in ("controls", "reference", "patients", "spacing", "seed", "workers")},
        "steps": steps, "validator_raw": raw_check, "validator_derivatives": derivatives_check,
        "pages": loads, "detection": detection,
        "subject_pages": {"count": len(sizes), "max_bytes": max(sizes), "median_bytes": float(np.median(sizes)),
                          "max_load_ms": max(times), "median_load_ms": float(np.median(times))},
    }  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten to {args.output}")


if __name__ == "__main__":
    main()
