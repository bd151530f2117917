"""The ``simpleslicenet`` command.

* ``fit``, ``validate``, ``test``, ``train``, ``export``: anomalib's own CLI, with simpleslicenet's models and
  datamodules registered (same arguments as ``anomalib <subcommand>``).
* ``predict``: NIfTI scans in, NIfTI anomaly maps and scores out, from an exported model or a checkpoint.
* ``calibrate``: a model's reference on healthy scans, for ``predict``'s p-value maps and FDR masks.
* ``phantom``: write the built-in brain phantom dataset (``--bids``: as a BIDS dataset).
* ``preprocess``: raw NIfTI scans and DICOM series to skull-stripped scans registered to MNI152 at 1 mm.
* ``bids``: the BIDS App: anomaly maps of a BIDS dataset as BIDS derivatives, with HTML reports.
* ``benchmark``: run a sweep of models × datasets × seeds from a YAML grid.
* ``edc``: fine-tune the slice encoder on normal slices (encoder–decoder contrast) for ``backbone_weights=``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from simpleslicenet.bids.command import (  # light: the models load only when a command runs
    add_bids_arguments,
    add_bids_input_arguments,
    bids_input_options,
    given_flags,
    scan_inputs,
)

__all__ = ["main"]

ANOMALIB_SUBCOMMANDS = ("fit", "validate", "test", "train", "export")


def _phantom(args: argparse.Namespace) -> None:
    from simpleslicenet.data.phantom import generate_phantom_dataset, write_phantom_bids

    # Left out, these take write_phantom_bids' defaults; without --bids they have no meaning.
    bids_only = {
        "n_reference": ("--reference", args.reference),
        "second_session": ("--second-session", args.second_session),
    }
    given = {key: value for key, (_, value) in bids_only.items() if value is not None}
    if given and not args.bids:
        flags = " and ".join(bids_only[key][0] for key in given)
        sys.exit(f"simpleslicenet phantom: {flags} only apply to a BIDS dataset: add --bids")
    if args.bids:
        try:
            root = write_phantom_bids(
                args.out,
                n_control=args.healthy,
                n_patient=args.lesion,
                spacing_mm=args.spacing,
                contrast=args.modality,
                seed=args.seed,
                **given,
                lesion_families=args.lesion_families,
                progress=True,
            )
        except ValueError as error:  # bad counts, contrast, family or spacing, or a folder holding other files
            sys.exit(f"simpleslicenet phantom: {error}")
        print(f"phantom BIDS dataset ready in {root}")
        return
    root = generate_phantom_dataset(
        args.out,
        n_healthy=args.healthy,
        n_lesion=args.lesion,
        contrast=args.modality,
        seed=args.seed,
        spacing_mm=args.spacing,
        progress=True,
        lesion_families=args.lesion_families,
    )
    print(f"phantom dataset ready in {root}")


def _preprocess(args: argparse.Namespace) -> None:
    from simpleslicenet.data.preprocess import PreprocessSettings, is_bids_dataset, preprocess_bids, preprocess_inputs

    bids = len(args.inputs) == 1 and is_bids_dataset(args.inputs[0])
    bids_options = bids_input_options(args, "lesion_masks")
    if not bids:
        given = given_flags(bids_options)
        if given:
            need = "need a BIDS dataset as the one input (a folder holding dataset_description.json)"
            sys.exit(f"simpleslicenet preprocess: {', '.join(given)} {need}")
        if args.output is None:
            sys.exit("simpleslicenet preprocess: --output is required (it defaults only for a BIDS dataset)")
    options = {
        "skull_stripped": args.skull_stripped,
        "dicom_only": args.dicom_only,
        "bias_correction": not args.no_bias_correction,
        "register": not args.no_registration,
        "seed": args.seed,
    }
    try:
        if args.quick:
            settings = PreprocessSettings.quick(spacing_mm=3.0 if args.spacing is None else args.spacing, **options)
        else:
            settings = PreprocessSettings(spacing_mm=1.0 if args.spacing is None else args.spacing, **options)
        batch = {"workers": args.workers, "overwrite": args.overwrite, "progress": not args.no_progress}
        if bids:
            bids_options["suffix"] = args.suffix or "T2w"
            bids_options["lesion_masks"] = args.lesion_masks or "auto"
            report = preprocess_bids(
                args.inputs[0], args.output, settings=settings, threads=args.threads, **bids_options, **batch
            )
        else:
            report = preprocess_inputs(args.inputs, args.output, settings=settings, threads=args.threads, **batch)
    except (ValueError, FileExistsError) as error:  # bad options or dataset, an unreadable manifest (VolumeError)
        sys.exit(f"simpleslicenet preprocess: {error}")
    if report.failed:
        sys.exit(1)


def _benchmark(args: argparse.Namespace) -> None:
    from simpleslicenet.benchmark import run_sweep

    run_sweep(args.config, output=args.output, resume=not args.restart)


def _calibrate(args: argparse.Namespace) -> None:
    from simpleslicenet.calibration import CalibrationError
    from simpleslicenet.data.nifti import VolumeError
    from simpleslicenet.deploy import ModelFileError, calibrate_paths

    try:
        calibration = calibrate_paths(
            model=args.model,
            inputs=scan_inputs(args, "calibrate", need_participants=True),
            output=args.output,
            overwrite=args.overwrite,
            precision=args.precision,
            device=args.device,
        )
    except (VolumeError, ModelFileError, FileExistsError, CalibrationError) as error:
        sys.exit(f"simpleslicenet calibrate: {error}")
    print(f"{args.output}: {calibration.n_scans} healthy scans, {calibration.n_voxels} brain voxels")


def _predict(args: argparse.Namespace) -> None:
    from simpleslicenet.data.nifti import VolumeError
    from simpleslicenet.deploy import ModelFileError, predict_paths

    try:
        report = predict_paths(
            model=args.model,
            inputs=scan_inputs(args, "predict"),
            output=args.output,
            threshold=args.threshold,
            overwrite=args.overwrite,
            precision=args.precision,
            device=args.device,
            fail_fast=args.fail_fast,
            calibration=args.calibration,
            fdr=args.fdr,
            previews=args.previews,
        )
    except (VolumeError, ModelFileError, FileExistsError, ValueError) as error:  # CalibrationError is a ValueError
        sys.exit(f"simpleslicenet predict: {error}")
    if not report.ok:
        # The batch is written; the exit status tells scripts that some scans were skipped.
        sys.exit(f"simpleslicenet predict: {len(report.failed)} of {len(report.failed) + len(report.scans)} scans "
                 f"failed and were skipped (listed in {report.output / 'scores.json'})")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="simpleslicenet", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in ANOMALIB_SUBCOMMANDS:
        sub.add_parser(name, help=f"anomalib {name} (see `simpleslicenet {name} --help`)", add_help=False)

    phantom = sub.add_parser("phantom", help="write the built-in brain phantom dataset")
    phantom.add_argument("--out", required=True, type=Path, help="output folder")
    phantom.add_argument("--healthy", type=int, default=24, help="number of healthy subjects")
    phantom.add_argument("--lesion", type=int, default=16, help="number of subjects with lesions")
    phantom.add_argument("--modality", default="t2", help="contrast of the scans: t1, t1ce, t2 or flair")
    phantom.add_argument("--seed", type=int, default=0)
    phantom.add_argument("--spacing", type=float, default=1.0, help="voxel size in mm")
    phantom.add_argument(
        "--lesion-families",
        nargs="+",
        default=["tumour"],
        metavar="FAMILY",
        help="lesion families of the lesion subjects, taken in turn: tumour, small, multifocal, hypointense",
    )
    phantom.add_argument(
        "--bids",
        action="store_true",
        help="write a BIDS dataset (participants.tsv groups control/reference/patient, masks under "
        "derivatives/lesions) instead of the folder layout; --healthy are the controls, --lesion the patients",
    )
    phantom.add_argument(
        "--reference", type=int, help="with --bids only: healthy participants held out for calibration (default 4)"
    )
    phantom.add_argument(
        "--second-session", type=int, help="with --bids only: participants with a second session (default 1)"
    )
    phantom.set_defaults(func=_phantom)

    prep = sub.add_parser(
        "preprocess",
        help="N4, register to MNI152 at 1 mm and skull-strip raw NIfTI scans and DICOM series",
        description="Bias-correct (N4), register rigidly then affinely to MNI152 2009, resample to the "
        "template's 1 mm grid and extract the brain; writes NAME.nii.gz, NAME_brain.nii.gz and NAME_mask.nii.gz "
        "(lesion masks carried along). Finished scans are skipped on a rerun; failures are reported at the end. "
        "A BIDS dataset given as the one input is written as a BIDS derivatives dataset (by default "
        "BIDS_DIR/derivatives/simpleslicenet-preprocess: <entities>[_space-MNI152NLin2009aAsym]_desc-preproc_<suffix>, "
        "_desc-brain_mask, _desc-lesion_mask, each with a JSON sidecar).",
    )
    prep.add_argument(
        "inputs",
        nargs="+",
        help="NIfTI scans, DICOM series folders, or folders holding either; or one BIDS dataset (its outputs are "
        "then a BIDS derivatives dataset)",
    )
    prep.add_argument(
        "--output",
        type=Path,
        default=None,
        help="output folder (keeps the inputs' sub-folders); for a BIDS dataset its derivatives folder, by default "
        "BIDS_DIR/derivatives/simpleslicenet-preprocess",
    )
    prep.add_argument("--skull-stripped", action="store_true", help="inputs hold only the brain: mask from intensities")
    prep.add_argument("--dicom-only", action="store_true", help="only convert DICOM series to NIfTI (geometry kept)")
    prep.add_argument("--workers", type=int, default=1, help="scans processed in parallel, one process each")
    prep.add_argument("--threads", type=int, default=None, help="threads per scan (default: CPU count / workers)")
    prep.add_argument("--spacing", type=float, default=None, help="output voxel size in mm (default 1; 3 with --quick)")
    prep.add_argument("--quick", action="store_true", help="coarse and fast, for a trial run (not for training data)")
    prep.add_argument("--no-bias-correction", action="store_true", help="skip N4")
    prep.add_argument("--no-registration", action="store_true", help="only reorient to RAS and resample")
    prep.add_argument("--seed", type=int, default=0, help="seed of the registration's random sampling")
    prep.add_argument("--overwrite", action="store_true", help="replace existing files this batch did not write")
    prep.add_argument("--no-progress", action="store_true", help="no progress bar")
    prep_bids = add_bids_input_arguments(
        prep,
        "participants to preprocess: COLUMN=VALUE[,VALUE] of participants.tsv, or labels (default: all)",
        derivatives=False,
    )
    prep_bids.add_argument(
        "--lesion-masks",
        default=None,
        metavar="NAME",
        help="derivatives folder holding the *_desc-lesion_mask files (default: any but the output)",
    )
    prep.set_defaults(func=_preprocess)

    bench = sub.add_parser("benchmark", help="run a benchmark sweep from a YAML grid")
    bench.add_argument("config", type=Path, help="sweep YAML, e.g. configs/benchmark/phantom_quick.yaml")
    bench.add_argument("--output", type=Path, default=None, help="results folder (default: from the config)")
    bench.add_argument("--restart", action="store_true", help="redo finished runs instead of resuming")
    bench.set_defaults(func=_benchmark)

    pred = sub.add_parser("predict", help="anomaly maps for NIfTI scans from an exported model or checkpoint")
    pred.add_argument("--model", required=True, type=Path, help="OpenVINO .xml or Lightning .ckpt")
    pred.add_argument("--input", required=True, type=Path, help="a NIfTI scan, a folder of scans, or a BIDS dataset")
    pred.add_argument("--output", required=True, type=Path, help="output folder")
    pred.add_argument(
        "--threshold",
        default=None,
        help="also write a mask of voxels at or above this score; 'val': the Dice threshold chosen on validation",
    )
    pred.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    pred.add_argument(
        "--fail-fast",
        action="store_true",
        help="stop at the first bad scan and write nothing (default: skip it, list it in scores.json, exit 1)",
    )
    pred.add_argument(
        "--calibration",
        type=Path,
        default=None,
        help="this model's calibration (simpleslicenet calibrate): p-value maps, scans ranked by volume p-value",
    )
    pred.add_argument(
        "--fdr",
        type=float,
        default=None,
        help="with --calibration: mask of voxels passing Benjamini-Hochberg at this false discovery rate, e.g. 0.05",
    )
    pred.add_argument("--previews", action="store_true", help="also write <scan>_preview.png of the slices that matter")
    pred.add_argument("--precision", choices=("f32", "bf16"), default="f32", help="OpenVINO inference precision")
    pred.add_argument("--device", default="CPU", help="OpenVINO device (or torch device for .ckpt)")
    add_bids_input_arguments(
        pred, "participants to run on: COLUMN=VALUE[,VALUE] of participants.tsv, or labels (default: all)"
    )
    pred.set_defaults(func=_predict)

    cal = sub.add_parser("calibrate", help="a model's reference on healthy scans, for p-values and FDR masks")
    cal.add_argument("--model", required=True, type=Path, help="OpenVINO .xml or Lightning .ckpt")
    cal.add_argument(
        "--input",
        required=True,
        type=Path,
        help="a folder of healthy scans the model never trained on, or a BIDS dataset (with --participants)",
    )
    cal.add_argument("--output", required=True, type=Path, help="calibration file to write (JSON)")
    cal.add_argument("--overwrite", action="store_true", help="replace an existing calibration file")
    cal.add_argument("--precision", choices=("f32", "bf16"), default="f32", help="OpenVINO inference precision")
    cal.add_argument("--device", default="CPU", help="OpenVINO device (or torch device for .ckpt)")
    add_bids_input_arguments(
        cal,
        "the held-out healthy participants: COLUMN=VALUE[,VALUE] of participants.tsv (e.g. group=reference), "
        "or labels; required with a BIDS dataset",
    )
    cal.set_defaults(func=_calibrate)

    add_bids_arguments(sub)

    from simpleslicenet.training.command import add_edc_arguments, run_edc_command  # light: no torch

    edc = sub.add_parser("edc", help="fine-tune the slice encoder on normal slices with encoder-decoder contrast")
    add_edc_arguments(edc)
    edc.set_defaults(func=run_edc_command)
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
