"""The command line of ``simpleslicenet bids`` and the options that choose scans of a BIDS dataset.

``predict``, ``calibrate`` and ``preprocess`` take the same BIDS input options as the BIDS App. Kept free
of heavy imports so that building the command line parser stays instant; the models, OpenVINO and the
reader load only when a command runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = [
    "add_bids_arguments",
    "add_bids_input_arguments",
    "bids_input_options",
    "given_flags",
    "run_bids_command",
    "scan_inputs",
]


def add_bids_input_arguments(
    parser: argparse.ArgumentParser, participants_help: str, derivatives: bool = True
) -> argparse._ArgumentGroup:
    """The options that choose scans when the input is a BIDS dataset; returns their group, for more.

    Args:
        parser: The command's parser (``predict``, ``calibrate``, ``bids``, ``preprocess``).
        participants_help: The command's help for ``--participants``.
        derivatives: Add ``--derivatives`` (read the preprocessed scans of a derivatives folder).
    """
    group = parser.add_argument_group("BIDS dataset input")
    group.add_argument("--participants", default=None, metavar="SPEC", help=participants_help)
    group.add_argument("--suffix", default=None, help="contrast to read (default T2w)")
    group.add_argument("--session", default=None, help="only this session (label)")
    group.add_argument("--acquisition", default=None, metavar="LABEL", help="only scans with this acq- label")
    group.add_argument("--run", default=None, metavar="INDEX", help="only scans with this run- index")
    if derivatives:
        group.add_argument(
            "--derivatives",
            default=None,
            metavar="NAME",
            help="read the preprocessed scans of derivatives/NAME (e.g. simpleslicenet-preprocess) instead of the "
            "raw ones",
        )
    return group


def bids_input_options(args: argparse.Namespace, *names: str) -> dict[str, object]:
    """The BIDS input options of ``args`` (those :func:`add_bids_input_arguments` adds, and ``names``)."""
    keys = ("participants", "suffix", "session", "acquisition", "run", *names)
    return {key: getattr(args, key) for key in keys}


def given_flags(options: dict[str, object]) -> list[str]:
    """The options given on the command line, as flags."""
    return [f"--{key.replace('_', '-')}" for key, value in options.items() if value is not None]


def scan_inputs(args: argparse.Namespace, command: str, need_participants: bool = False) -> Path | list:
    """``--input`` as a path, or, for a BIDS dataset, the scans its options choose (exits on a mistake)."""
    from simpleslicenet.data.bids import is_bids_dataset
    from simpleslicenet.deploy.predict import bids_scan_files

    options = bids_input_options(args, "derivatives")
    if not is_bids_dataset(args.input):
        given = given_flags(options)
        if given:
            need = "need --input to be a BIDS dataset (a folder holding dataset_description.json)"
            sys.exit(f"simpleslicenet {command}: {', '.join(given)} {need}")
        return args.input
    if need_participants and args.participants is None:
        need = "with a BIDS dataset, --participants must choose the held-out healthy participants, e.g. group=reference"
        sys.exit(f"simpleslicenet {command}: {need}")
    options["suffix"] = args.suffix or "T2w"
    return bids_scan_files(args.input, **options)


def run_bids_command(args: argparse.Namespace) -> None:
    """Run ``simpleslicenet bids`` with the parsed ``args`` (exits with a message on a mistake)."""
    from simpleslicenet.bids import ParticipantOptions, run_group, run_participant
    from simpleslicenet.data.nifti import VolumeError
    from simpleslicenet.deploy import ModelFileError
    from simpleslicenet.executors import ExecutorSettings

    command = f"simpleslicenet bids {args.analysis_level}"
    if args.analysis_level == "group":
        # The group level reports every scan the participant level finished; choosing is the participant level's.
        given = given_flags({"participant_label": args.participant_label, **bids_input_options(args, "derivatives")})
        if given:
            sys.exit(f"{command}: {', '.join(given)} choose scans at the participant level only; the group level "
                     "reports every scan the participant level finished")
        try:
            page = run_group(args.bids_dir, args.output_dir, calibration=args.calibration)
        except (VolumeError, FileNotFoundError, ValueError) as error:  # CalibrationError is a ValueError
            sys.exit(f"{command}: {error}")
        print(f"{page}: group report ({args.output_dir / 'group_scores.tsv'}: the table)")
        return
    if args.model is None:
        sys.exit(f"{command}: --model is required (an exported model.xml or a .ckpt)")
    if args.participant_label and args.participants:
        sys.exit(f"{command}: give --participant-label or --participants, not both")
    if args.executor != "ray" and (args.ray_address is not None or args.ray_shared_output is not None):
        sys.exit(f"{command}: --ray-address and --ray-shared-output need --executor ray")
    executor = ExecutorSettings(
        kind=args.executor, address=args.ray_address, num_cpus=args.ray_cpus, shared_output=args.ray_shared_output
    )
    options = ParticipantOptions(
        model=str(args.model),
        calibration=None if args.calibration is None else str(args.calibration),
        fdr=args.fdr,
        threshold=args.threshold,
        suffix=args.suffix or "T2w",
        session=args.session,
        acquisition=args.acquisition,
        run=args.run,
        derivatives=args.derivatives,
        reports=not args.no_reports,
        precision=args.precision,
        device=args.device,
    )
    try:
        report = run_participant(
            args.bids_dir,
            args.output_dir,
            options,
            participants=args.participant_label or args.participants,
            workers=args.workers,
            progress=not args.no_progress,
            executor=executor,
        )
    except (VolumeError, ModelFileError, FileExistsError, ValueError, ImportError) as error:  # BidsError: a VolumeError
        sys.exit(f"{command}: {error}")
    print(report.summary())
    if not report.ok:
        names = ", ".join(failure["name"] for failure in report.failed)
        sys.exit(f"{command}: {len(report.failed)} scans failed: {names}")


def add_bids_arguments(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``bids`` subcommand to ``sub`` (the subparsers of ``simpleslicenet``)."""
    bids = sub.add_parser(
        "bids",
        help="BIDS App: anomaly maps of a BIDS dataset as a derivatives dataset, with HTML reports",
        description="participant: per scan the anomaly map, p-value map and mask with JSON sidecars and an HTML "
        "report, as a BIDS derivatives dataset in OUTPUT_DIR (finished scans are skipped on a rerun); group: "
        "group_scores.tsv and group_report.html from whatever finished.",
    )
    bids.add_argument("bids_dir", type=Path, help="the BIDS dataset")
    bids.add_argument("output_dir", type=Path, help="the derivatives folder, e.g. BIDS_DIR/derivatives/simpleslicenet")
    bids.add_argument("analysis_level", choices=("participant", "group"))
    bids.add_argument("--model", type=Path, default=None, help="OpenVINO .xml or Lightning .ckpt (participant)")
    bids.add_argument(
        "--calibration",
        type=Path,
        default=None,
        help="this model's calibration (simpleslicenet calibrate): p-value maps and volume p-values",
    )
    bids.add_argument("--fdr", type=float, default=None, help="with --calibration: mask at this false discovery rate")
    bids.add_argument(
        "--threshold", default=None, help="mask of voxels at or above this score; 'val': the validation threshold"
    )
    bids.add_argument("--participant-label", nargs="+", default=None, metavar="LABEL", help="participants (01 02 ...)")
    add_bids_input_arguments(bids, "participants chosen by COLUMN=VALUE[,VALUE] of participants.tsv, or labels")
    bids.add_argument("--workers", type=int, default=1, help="worker processes, one model load each")
    bids.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="where subjects run: local worker processes, or one Ray task each (local Ray, or --ray-address)",
    )
    bids.add_argument("--ray-address", default=None, help="with --executor ray: the cluster to join (e.g. auto)")
    bids.add_argument("--ray-cpus", type=float, default=1.0, help="with --executor ray: CPUs each subject asks for")
    bids.add_argument(
        "--ray-shared-output",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with --executor ray: OUTPUT_DIR is at the same path on every node (default: yes for a local Ray, "
        "no when joining a cluster; if not, each subject's files come back to this machine)",
    )
    bids.add_argument("--no-reports", action="store_true", help="no HTML report per scan")
    bids.add_argument("--no-progress", action="store_true", help="no progress bar")
    bids.add_argument("--precision", choices=("f32", "bf16"), default="f32", help="OpenVINO inference precision")
    bids.add_argument("--device", default="CPU", help="OpenVINO device (or torch device for .ckpt)")
    bids.set_defaults(func=run_bids_command)
    return bids
