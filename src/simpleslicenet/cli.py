"""The ``simpleslicenet`` command.

* ``fit``, ``validate``, ``test``, ``train``, ``export``: anomalib's own CLI, with simpleslicenet's models and
  datamodules registered (same arguments as ``anomalib <subcommand>``).
* ``predict``: NIfTI scans in, NIfTI anomaly maps and scores out, from an exported model or a checkpoint.
* ``phantom``: write the built-in brain phantom dataset.
* ``preprocess``: reorient, resample and roughly align raw scans to MNI152.
* ``benchmark``: run a sweep of models × datasets × seeds from a YAML grid.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main"]

ANOMALIB_SUBCOMMANDS = ("fit", "validate", "test", "train", "export")


def _phantom(args: argparse.Namespace) -> None:
    from simpleslicenet.data.phantom import generate_phantom_dataset

    root = generate_phantom_dataset(
        args.out,
        n_healthy=args.healthy,
        n_lesion=args.lesion,
        contrast=args.contrast,
        seed=args.seed,
        spacing_mm=args.spacing,
        progress=True,
    )
    print(f"phantom dataset ready in {root}")


def _preprocess(args: argparse.Namespace) -> None:
    from simpleslicenet.data.preprocess import preprocess_scan

    for path in args.inputs:
        out = Path(args.output) / Path(path).name
        preprocess_scan(path, out, overwrite=args.overwrite)
        print(out)


def _benchmark(args: argparse.Namespace) -> None:
    from simpleslicenet.benchmark import run_sweep

    run_sweep(args.config, output=args.output, resume=not args.restart)


def _predict(args: argparse.Namespace) -> None:
    from simpleslicenet.deploy import predict_paths

    predict_paths(
        model=args.model,
        inputs=args.input,
        output=args.output,
        threshold=args.threshold,
        overwrite=args.overwrite,
        precision=args.precision,
        device=args.device,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="simpleslicenet", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in ANOMALIB_SUBCOMMANDS:
        sub.add_parser(name, help=f"anomalib {name} (see `simpleslicenet {name} --help`)", add_help=False)

    phantom = sub.add_parser("phantom", help="write the built-in brain phantom dataset")
    phantom.add_argument("--out", required=True, type=Path, help="output folder")
    phantom.add_argument("--healthy", type=int, default=24, help="number of healthy subjects")
    phantom.add_argument("--lesion", type=int, default=16, help="number of subjects with lesions")
    phantom.add_argument("--contrast", default="t2", help="t1, t2 or flair")
    phantom.add_argument("--seed", type=int, default=0)
    phantom.add_argument("--spacing", type=float, default=1.0, help="voxel size in mm")
    phantom.set_defaults(func=_phantom)

    prep = sub.add_parser("preprocess", help="reorient, resample to 1 mm and align scans to MNI152")
    prep.add_argument("inputs", nargs="+", help="NIfTI scans")
    prep.add_argument("--output", required=True, type=Path, help="output folder")
    prep.add_argument("--overwrite", action="store_true")
    prep.set_defaults(func=_preprocess)

    bench = sub.add_parser("benchmark", help="run a benchmark sweep from a YAML grid")
    bench.add_argument("config", type=Path, help="sweep YAML, e.g. configs/benchmark/phantom_quick.yaml")
    bench.add_argument("--output", type=Path, default=None, help="results folder (default: from the config)")
    bench.add_argument("--restart", action="store_true", help="redo finished runs instead of resuming")
    bench.set_defaults(func=_benchmark)

    pred = sub.add_parser("predict", help="anomaly maps for NIfTI scans from an exported model or checkpoint")
    pred.add_argument("--model", required=True, type=Path, help="OpenVINO .xml or Lightning .ckpt")
    pred.add_argument("--input", required=True, type=Path, help="a NIfTI scan or a folder of scans")
    pred.add_argument("--output", required=True, type=Path, help="output folder")
    pred.add_argument(
        "--threshold",
        default=None,
        help="also write a mask of voxels above this score; 'val': the Dice threshold chosen on validation",
    )
    pred.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    pred.add_argument("--precision", choices=("f32", "bf16"), default="f32", help="OpenVINO inference precision")
    pred.add_argument("--device", default="CPU", help="OpenVINO device (or torch device for .ckpt)")
    pred.set_defaults(func=_predict)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``simpleslicenet`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ANOMALIB_SUBCOMMANDS:
        from anomalib.cli.cli import AnomalibCLI
        from anomalib.loggers import configure_logger

        from simpleslicenet.plugin import register

        register()
        configure_logger()
        AnomalibCLI(argv)
        return
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return
    args.func(args)


if __name__ == "__main__":
    main()
