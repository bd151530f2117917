"""How long the brain phantom takes to make one volume, in memory and on disk.

For each spacing it times ``generate_subject`` for healthy and lesion subjects (median of a few
subjects, after one warm-up that loads and resamples the MNI152 maps), and the atomic NIfTI write of
the three files of a subject. Prints a table and writes ``benchmarks/results/phantom_speed.json``.

    python benchmarks/phantom_speed.py                 # 1 mm and 2 mm, 5 subjects each
    python benchmarks/phantom_speed.py --spacings 4 --subjects 2
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from simpleslicenet import __version__
from simpleslicenet.data.phantom import generate_subject, load_tissue_template, write_subject

RESULTS = Path(__file__).resolve().parent / "results" / "phantom_speed.json"


def _median_seconds(run, count: int) -> tuple[float, list[float]]:  # noqa: ANN001
    times = []
    for index in range(count):
        start = time.perf_counter()
        run(index)
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spacings", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument("--subjects", type=int, default=5, help="volumes timed per row")
    parser.add_argument("--contrast", default="t2")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    rows = []
    for spacing in args.spacings:
        start = time.perf_counter()
        template = load_tissue_template(spacing)
        template_seconds = time.perf_counter() - start
        generate_subject(10_000, lesion=True, contrast=args.contrast, spacing_mm=spacing)  # warm-up
        for lesion in (False, True):
            median, times = _median_seconds(
                lambda i, lesion=lesion: generate_subject(i, lesion=lesion, contrast=args.contrast, spacing_mm=spacing),
                args.subjects,
            )
            rows.append(
                {
                    "spacing_mm": spacing,
                    "shape": list(template.shape),
                    "what": "generate lesion subject" if lesion else "generate healthy subject",
                    "median_s": round(median, 4),
                    "times_s": [round(t, 4) for t in times],
                }
            )
        subjects = [generate_subject(i, lesion=True, contrast=args.contrast, spacing_mm=spacing) for i in range(args.subjects)]
        with tempfile.TemporaryDirectory() as folder:
            median, times = _median_seconds(lambda i: write_subject(subjects[i], folder), args.subjects)
        rows.append(
            {
                "spacing_mm": spacing,
                "shape": list(template.shape),
                "what": "write 3 NIfTI files",
                "median_s": round(median, 4),
                "times_s": [round(t, 4) for t in times],
            }
        )
        rows.append(
            {
                "spacing_mm": spacing,
                "shape": list(template.shape),
                "what": "load + resample MNI maps (once per process)",
                "median_s": round(template_seconds, 4),
                "times_s": [round(template_seconds, 4)],
            }
        )

    print(f"{'spacing':>8} {'grid':>14} {'what':<44} {'median s':>9}")
    for row in rows:
        grid = "×".join(str(n) for n in row["shape"])
        print(f"{row['spacing_mm']:>6g}mm {grid:>14} {row['what']:<44} {row['median_s']:>9.3f}")
    result = {
        "benchmark": "phantom_speed",
        "package_version": __version__,
        "contrast": args.contrast,
        "subjects_per_row": args.subjects,
        "machine": {"cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads()},
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
