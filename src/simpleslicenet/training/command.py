"""The ``simpleslicenet edc`` subcommand: its arguments and what it runs.

Kept free of heavy imports so that building the command line parser stays instant; torch, timm and
anomalib load only when the subcommand runs.

Example:
    simpleslicenet edc --data datasets/Br35H --out encoder.pth
    simpleslicenet edc --data BrainPhantom --data-arg n_healthy=24 --data-arg n_lesion=16 \\
        --out results/edc/encoder.pth --steps 4000 --batch-size 32
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["DEFAULTS", "add_edc_arguments", "parse_data_args", "parse_stages", "run_edc_command"]

# Defaults of EDC's Br35H run, the same as EDCSettings' (a test keeps the two equal); spelled out
# here so that building the parser does not import torch.
DEFAULTS = {
    "backbone": "tf_efficientnet_lite0",
    "backbone_weights": "imagenet",
    "stages": (1, 2, 3),
    "steps": 4000,
    "batch_size": 32,
    "lr_encoder": 5e-5,
    "lr_decoder": 5e-4,
    "weight_decay": 1e-4,
    "grad_clip": 1.0,
    "bn_momentum": 0.01,
    "anchor_weight": 0.0,
    "seed": 0,
}


def parse_data_args(items: list[str]) -> dict:
    """``KEY=VALUE`` strings to a dict; values are read as YAML (``24`` → int, ``[32, 32, 16]`` → list).

    Raises:
        ValueError: If an item has no ``=``.
    """
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            msg = f"--data-arg expects KEY=VALUE, got {item!r}"
            raise ValueError(msg)
        out[key.strip()] = yaml.safe_load(value)
    return out


def parse_stages(values: list[str]) -> tuple[int | str, ...]:
    """Stage arguments: integers are feature-info indices, other words module names (``blocks.2``)."""
    return tuple(int(v) if str(v).isdigit() else str(v) for v in values)


def add_edc_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``edc`` subcommand's arguments to ``parser``."""
    data = parser.add_argument_group("data (normal slices only)")
    data.add_argument(
        "--data",
        required=True,
        help="a Br35H folder (yes/, no/: its training split of no/ is used), a folder of normal 2-D slice "
        "images, a datamodule name (BrainPhantom, NiftiFolder, IXI, ...: brain slices of its healthy training "
        "volumes) or a datamodule YAML (class_path, init_args)",
    )
    data.add_argument(
        "--data-arg", action="append", default=[], metavar="KEY=VALUE", help="datamodule init argument (repeatable)"
    )
    data.add_argument(
        "--image-size", type=int, nargs=2, default=None, metavar=("H", "W"),
        help="resize slices (default: a datamodule's own size; 256 256 for image folders and Br35H, as EDC)",
    )
    model = parser.add_argument_group("encoder")
    model.add_argument("--backbone", default=DEFAULTS["backbone"], help="timm model name")
    model.add_argument(
        "--backbone-weights", default=DEFAULTS["backbone_weights"], help="starting weights: imagenet or a .pth/.safetensors file"
    )
    model.add_argument(
        "--stages", nargs="+", default=[str(s) for s in DEFAULTS["stages"]],
        help="stages the decoder rebuilds from the last one (feature-info indices or module names)",
    )
    model.add_argument("--out", required=True, type=Path, help="encoder weights file (.pth or .safetensors)")
    train = parser.add_argument_group("training (defaults: EDC's Br35H settings)")
    train.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="optimiser steps")
    train.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="slices per step")
    train.add_argument("--lr-encoder", type=float, default=DEFAULTS["lr_encoder"], help="AdamW learning rate of the encoder")
    train.add_argument("--lr-decoder", type=float, default=DEFAULTS["lr_decoder"], help="AdamW learning rate of the decoder")
    train.add_argument("--weight-decay", type=float, default=DEFAULTS["weight_decay"], help="AdamW weight decay")
    train.add_argument("--grad-clip", type=float, default=DEFAULTS["grad_clip"], help="gradient norm clip (0: off)")
    train.add_argument("--bn-momentum", type=float, default=DEFAULTS["bn_momentum"], help="batch-norm momentum")
    train.add_argument(
        "--anchor-weight", type=float, default=DEFAULTS["anchor_weight"],
        help="pull towards the frozen starting features (not part of EDC; 0: off)",
    )
    train.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="seed of decoder initialisation and batch order")
    run = parser.add_argument_group("run")
    run.add_argument("--checkpoint-every", type=int, default=100, help="steps between resume checkpoints")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    run.add_argument("--restart", action="store_true", help="ignore an existing checkpoint beside --out")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_edc_command(args: argparse.Namespace) -> None:
    """Load the slices, fine-tune, and print where the weights went."""
    from simpleslicenet.training.data import load_normal_slices
    from simpleslicenet.training.edc import EDCSettings
    from simpleslicenet.training.edc_run import train_edc

    settings = EDCSettings(
        backbone=args.backbone,
        backbone_weights=args.backbone_weights,
        stages=parse_stages(args.stages),
        steps=args.steps,
        batch_size=args.batch_size,
        lr_encoder=args.lr_encoder,
        lr_decoder=args.lr_decoder,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        bn_momentum=args.bn_momentum,
        anchor_weight=args.anchor_weight,
        seed=args.seed,
    )
    slices = load_normal_slices(args.data, parse_data_args(args.data_arg), args.image_size)
    print(f"EDC: {len(slices)} normal slices of {slices.image_size[0]}x{slices.image_size[1]} from {slices.source}")
    result = train_edc(
        slices,
        args.out,
        settings,
        checkpoint_every=args.checkpoint_every,
        device=args.device,
        restart=args.restart,
        progress=not args.no_progress,
    )
    print(f"encoder weights: {result.weights}  (SimpleSliceNet(backbone_weights={str(result.weights)!r}))")
    print(f"loss curve: {result.loss_curve}  summary: {result.summary}  checkpoint: {result.checkpoint}")
