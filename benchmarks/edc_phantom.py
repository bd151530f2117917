"""SimpleSliceNet on the brain phantom with its ImageNet encoder and with an EDC-tuned encoder.

For each seed (each seed is a different phantom and split, as in the sweep):

1. the phantom of ``configs/benchmark/phantom_quick.yaml`` is generated and split;
2. the encoder is fine-tuned with EDC (:mod:`simpleslicenet.training.edc`) on the brain slices of that
   split's **healthy training volumes only** (EDC's Br35H settings unless overridden);
3. SimpleSliceNet with the sweep's settings (the ``SimpleSliceNet`` entry of the config) is trained and
   tested twice through the sweep's own single-run protocol (threshold chosen on validation):
   ``backbone_weights="imagenet"`` and ``backbone_weights=<tuned encoder>``.

Prints a table (voxel AUPRC/AUROC, volume AUROC, Dice at the validation threshold; mean ± std over
seeds) and writes ``benchmarks/results/edc_phantom.json``. Encoders, their checkpoints and per-run
results are kept under ``--workdir``; an interrupted measurement resumes (EDC from its last checkpoint,
finished runs are not redone).

    python benchmarks/edc_phantom.py             # full: 3 seeds, EDC 4000 steps x 32 slices per seed
    python benchmarks/edc_phantom.py --quick     # a check that everything runs: tiny phantom, 1 seed, 4 EDC steps

The full measurement trains EDC for 4000 steps per seed; on a 2-core CPU that takes hours, with a GPU
(``--device cuda``) minutes. Run it on a quiet machine: timings are reported with the results.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "benchmark" / "phantom_quick.yaml"
RESULTS = ROOT / "benchmarks" / "results" / "edc_phantom.json"
WORKDIR = ROOT / "results" / "edc_phantom"

METRICS = {
    "voxel_AUPRC": "voxel AUPRC",
    "voxel_AUROC": "voxel AUROC",
    "volume_AUROC": "volume AUROC",
    "voxel_valDice": "Dice @ val thr.",
}
# The quick check: a phantom the tests use, one seed, a few EDC steps, one short epoch.
QUICK_DATASET = {"n_healthy": 4, "n_lesion": 3, "spacing_mm": 4.0, "target_shape": [32, 32, 16]}
QUICK_MODEL = {"flow_blocks": 2, "smoothing_sigma": 1.0}


def _sweep_entry(config_path: Path) -> tuple[str, dict, dict, dict, list[int]]:
    """Dataset class and args, SimpleSliceNet args (its packaged ``config`` included), trainer and seeds."""
    from simpleslicenet.benchmark import load_sweep

    runs = [run for run in load_sweep(config_path).runs if run.label == "SimpleSliceNet"]
    if not runs:
        msg = f"{config_path}: no SimpleSliceNet entry"
        raise ValueError(msg)
    first = runs[0]
    seeds = sorted({run.seed for run in runs if run.dataset == first.dataset})
    return first.dataset_class, dict(first.dataset_args), dict(first.model_args), dict(first.trainer), seeds


def _fine_tune(dataset_class: str, dataset_args: dict, seed: int, out: Path, args: argparse.Namespace) -> dict:
    """EDC on the healthy training slices of the seed's phantom; returns what the run reported."""
    from simpleslicenet.benchmark.single_run import load_datamodule
    from simpleslicenet.training import EDCSettings, slices_from_datamodule, train_edc

    datamodule = load_datamodule(dataset_class, {**dataset_args, "seed": seed})
    datamodule.prepare_data()
    datamodule.setup()
    slices = slices_from_datamodule(datamodule)
    settings = EDCSettings(
        backbone=args.backbone, steps=args.edc_steps, batch_size=args.edc_batch_size, seed=seed,
        stages=tuple(args.edc_stages),
    )
    started = time.perf_counter()
    result = train_edc(slices, out, settings, device=args.device, progress=not args.no_progress)
    summary = json.loads(result.summary.read_text())
    return {
        "weights": str(result.weights),
        "n_slices": len(slices),
        "n_train_volumes": len(datamodule.train_data),
        "edc_train_seconds": summary["train_seconds"],
        "edc_wall_seconds_this_call": time.perf_counter() - started,
        "first_loss": summary["first_loss"],
        "final_loss_mean_last_50": summary["final_loss_mean_last_50"],
        "final_drift": summary["final_drift"],
        "device": summary["device"],
    }


def _run(variant: str, weights: str, seed: int, base: dict, cache: Path) -> dict:
    """One SimpleSliceNet fit + test by the sweep's single-run protocol, in its own process (cached)."""
    if cache.is_file():
        return json.loads(cache.read_text())
    from simpleslicenet.atomic import atomic_write_text

    spec = {
        "run_id": cache.stem,
        "label": f"SimpleSliceNet ({variant})",
        "model": "SimpleSliceNet",
        "model_args": {**base["model_args"], "backbone_weights": weights},
        "dataset_class": base["dataset_class"],
        "dataset_args": base["dataset_args"],
        "trainer": base["trainer"],
        "seed": seed,
        "export": False,
    }
    spec_path = cache.with_name(f"{cache.stem}.spec.json")
    result_path = cache.with_name(f"{cache.stem}.result.json")
    atomic_write_text(spec_path, json.dumps(spec, indent=2))
    # A process per run, as the sweep does: no allocator state or caches carried between runs.
    subprocess.run(
        [sys.executable, "-m", "simpleslicenet.benchmark.single_run", str(spec_path), str(result_path)], check=True
    )
    result = json.loads(result_path.read_text())
    record = {
        "variant": variant,
        "seed": seed,
        "metrics": result["metrics"],
        "val_threshold": result["val_threshold"],
        "fit_seconds": result["fit_seconds"],
        "inference_seconds_per_volume": result["inference_seconds_per_volume"],
        "peak_ram_mb": result.get("peak_ram_mb"),
    }
    atomic_write_text(cache, json.dumps(record, indent=2, default=str))
    return record


def _mean_std(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return float("nan"), float("nan")
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def _table(runs: list[dict], variants: list[str]) -> tuple[str, dict]:
    header = "| encoder | seeds | " + " | ".join(METRICS.values()) + " | fit s |"
    lines = [header, "|" + "---|" * (len(METRICS) + 3)]
    summary = {}
    for variant in variants:
        rows = [r for r in runs if r["variant"] == variant]
        stats = {name: _mean_std([float(r["metrics"].get(name, float("nan"))) for r in rows]) for name in METRICS}
        fit = _mean_std([r["fit_seconds"] for r in rows])
        summary[variant] = {name: {"mean": m, "std": s} for name, (m, s) in stats.items()} | {"fit_seconds": {"mean": fit[0], "std": fit[1]}}
        cells = " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in stats.values())
        lines.append(f"| {variant} | {len(rows)} | {cells} | {fit[0]:.0f} ± {fit[1]:.0f} |")
    return "\n".join(lines), summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=CONFIG, help="sweep config with a SimpleSliceNet entry")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the config's seeds")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0", help="must match the model's backbone")
    parser.add_argument("--edc-steps", type=int, default=4000)
    parser.add_argument("--edc-batch-size", type=int, default=32)
    parser.add_argument("--edc-stages", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--device", default="auto", help="EDC device; 'cuda' also trains SimpleSliceNet on the GPU")
    parser.add_argument("--workdir", type=Path, default=WORKDIR, help="encoders, checkpoints, per-run results")
    parser.add_argument("--output", type=Path, default=None, help=f"default: {RESULTS.relative_to(ROOT)}")
    parser.add_argument("--quick", action="store_true", help="tiny phantom, 1 seed, 4 EDC steps of 4 slices, 1 epoch")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    dataset_class, dataset_args, model_args, trainer, seeds = _sweep_entry(args.config)
    model_args.setdefault("backbone", args.backbone)
    if model_args["backbone"] != args.backbone:
        parser.error(f"--backbone {args.backbone} differs from the config's {model_args['backbone']}")
    if args.quick:
        dataset_args |= QUICK_DATASET
        model_args |= QUICK_MODEL
        trainer["max_epochs"] = 1
        seeds = seeds[:1]
        args.edc_steps, args.edc_batch_size = min(args.edc_steps, 4), min(args.edc_batch_size, 4)
        args.workdir = args.workdir / "quick"
    if args.device.startswith("cuda"):
        trainer["accelerator"] = "gpu"
    seeds = args.seeds or seeds
    output = args.output or (args.workdir / "edc_phantom_quick.json" if args.quick else RESULTS)
    base = {"dataset_class": dataset_class, "dataset_args": dataset_args, "model_args": model_args, "trainer": trainer}

    runs, edc = [], {}
    for seed in seeds:
        seed_dir = args.workdir / f"seed{seed}"
        edc[seed] = _fine_tune(dataset_class, dataset_args, seed, seed_dir / "encoder.pth", args)
        print(f"seed {seed}: EDC on {edc[seed]['n_slices']} healthy training slices, {edc[seed]['edc_train_seconds']:.0f} s")
        for variant, weights in (("ImageNet", "imagenet"), ("EDC", edc[seed]["weights"])):
            record = _run(variant, weights, seed, base, seed_dir / f"simpleslicenet_{variant.lower()}.json")
            runs.append(record)
            print(f"seed {seed} {variant}: " + ", ".join(f"{k} {record['metrics'].get(k, float('nan')):.3f}" for k in METRICS))

    table, summary = _table(runs, ["ImageNet", "EDC"])
    print(table)
    import torch

    result = {
        "what": "SimpleSliceNet on the brain phantom: ImageNet encoder vs EDC-tuned encoder (healthy training slices only)",
        "command": "python benchmarks/edc_phantom.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "quick": args.quick,
        "config": str(args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config),
        "seeds": seeds,
        "dataset": {"class_path": dataset_class, "init_args": dataset_args},
        "model_args": model_args,
        "trainer": trainer,
        "edc": {"steps": args.edc_steps, "batch_size": args.edc_batch_size, "stages": args.edc_stages, "per_seed": edc},
        "runs": runs,
        "summary": summary,
        "table": table,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()},
    }
    from simpleslicenet.atomic import atomic_write_text

    for record in edc.values():  # the results name files by their place in the checkout, not on this machine
        weights = Path(record["weights"])
        record["weights"] = str(weights.relative_to(ROOT)) if weights.is_relative_to(ROOT) else weights.name
    atomic_write_text(output, json.dumps(result, indent=2, default=str) + "\n")
    print(f"written {output}")
    return result


if __name__ == "__main__":
    main()
