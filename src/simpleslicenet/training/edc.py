"""Encoder–decoder contrast (EDC): fine-tune an ImageNet slice encoder on normal slices.

Guo, Lu, Jia, Zhang & Li, "Encoder-Decoder Contrast for Unsupervised Anomaly Detection in Medical
Images", IEEE Transactions on Medical Imaging 43(3), 2024 (https://ieeexplore.ieee.org/document/10296925,
code: https://github.com/guojiajeremy/EDC). SimpleSliceNet's authors use an EDC-tuned encoder in place
of the plain ImageNet one (https://github.com/Jarvisarmy/SimpleSliceNet).

What is trained, per step on a batch of normal slices:

* the **encoder** (a whole timm model started from ImageNet weights) gives its stage maps
  ``e_1 .. e_k`` and a deeper bottleneck map ``e_b``;
* the **decoder** (:class:`~simpleslicenet.training.decoder.FeatureDecoder`) sees only ``e_b`` and
  rebuilds ``d_1 .. d_k``;
* the loss is ``sum_i 1 − cos(flatten(d_i), flatten(e_i))`` per slice, averaged over the batch: one
  cosine over each slice's whole map (EDC's "globality", which the paper adds for stability), not one
  per location;
* the **contrast**: the targets ``e_i`` are detached (stop-gradient), so the encoder learns only through
  the bottleneck it hands the decoder. Encoder and decoder are the two branches of a SimSiam-like
  contrast; without the stop-gradient both could agree on a constant map (pattern collapse).

A frozen copy of the starting encoder is kept beside it. Its features measure the **drift** of the
fine-tuned encoder from ImageNet features (plotted with the loss), and with ``anchor_weight > 0`` it adds
``anchor_weight · sum 1 − cos(e, e_frozen)``, which holds the encoder near its starting features. The
published EDC has no such term, so the default is 0.

Settings default to EDC's Br35H run: 4000 iterations, batch 32, AdamW (weight decay 1e-4), encoder
learning rate 5e-5, decoder 5e-4, constant learning rates, gradients clipped to norm 1, batch-norm momentum
0.01. The stages rebuilt default to feature-info indices 1–3 (stride 4, 8, 16) from the stride-32 stage,
as EDC rebuilds ResNet layer1–3 from layer4; they cover the stages SimpleSliceNet and the slice-wise
models read.

The run is resumable: every ``checkpoint_every`` steps encoder, decoder, optimiser and history are
saved; rerunning with the same settings and data continues from the last saved step and gives the same
weights as an uninterrupted run (bit for bit on the CPU). A finished run can be extended by asking for
more ``steps``.

Example:
    >>> from simpleslicenet.training import EDCSettings, load_normal_slices, train_edc
    >>> slices = load_normal_slices("datasets/Br35H")  # doctest: +SKIP
    >>> result = train_edc(slices, "encoder.pth", EDCSettings())  # doctest: +SKIP
    >>> from simpleslicenet.models.simpleslicenet import SimpleSliceNet
    >>> model = SimpleSliceNet(backbone_weights=result.weights)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from simpleslicenet.training.data import NormalSlices
from simpleslicenet.training.decoder import FeatureDecoder
from simpleslicenet.training.outputs import (
    check_encoder_weights,
    load_checkpoint,
    output_paths,
    save_checkpoint,
    save_encoder_weights,
    write_loss_curve,
    write_summary,
)

__all__ = [
    "EDCNetwork",
    "EDCResult",
    "EDCResumeError",
    "EDCSettings",
    "global_cosine_distance",
    "initial_encoder_state",
    "train_edc",
]

logger = logging.getLogger(__name__)


class EDCResumeError(RuntimeError):
    """An existing checkpoint belongs to a different run (other settings, weights or data)."""


@dataclass(frozen=True)
class EDCSettings:
    """What defines an EDC run; everything except ``steps`` must match to resume a checkpoint.

    Args:
        backbone: timm model name.
        backbone_weights: Starting weights: ``"imagenet"`` or a ``.pth``/``.safetensors`` file.
        stages: Stages to rebuild (feature-info indices or module names), all shallower than the last stage,
            which is the bottleneck the decoder reads.
        steps: Optimiser steps (EDC: 4000).
        batch_size: Slices per step (EDC: 32).
        lr_encoder: AdamW learning rate of the encoder (EDC: 5e-5).
        lr_decoder: AdamW learning rate of the decoder (EDC: 5e-4).
        weight_decay: AdamW weight decay (EDC: 1e-4).
        grad_clip: Clip the gradient norm to this (EDC: 1); ``0`` disables clipping.
        bn_momentum: Batch-norm momentum of encoder and decoder (EDC: 0.01), so the running statistics
            the frozen downstream models use adapt slowly to the new domain.
        anchor_weight: Weight of the pull towards the frozen starting features (not in EDC; 0 disables it).
        seed: Seed of the decoder's initialisation and of the batch order.
    """

    backbone: str = "tf_efficientnet_lite0"
    backbone_weights: str = "imagenet"
    stages: tuple[int | str, ...] = (1, 2, 3)
    steps: int = 4000
    batch_size: int = 32
    lr_encoder: float = 5e-5
    lr_decoder: float = 5e-4
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    bn_momentum: float = 0.01
    anchor_weight: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "backbone_weights", str(self.backbone_weights))
        object.__setattr__(self, "stages", tuple(self.stages))
        problems = []
        if self.steps < 1 or self.batch_size < 1:
            problems.append(f"steps and batch_size must be positive (got {self.steps}, {self.batch_size})")
        if min(self.lr_encoder, self.lr_decoder) < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            problems.append("learning rates, weight decay and grad_clip must not be negative")
        if not 0.0 <= self.bn_momentum <= 1.0:
            problems.append(f"bn_momentum must lie in [0, 1], got {self.bn_momentum}")
        if self.anchor_weight < 0:
            problems.append(f"anchor_weight must not be negative, got {self.anchor_weight}")
        if not self.stages:
            problems.append("at least one stage to rebuild is needed")
        if self.backbone_weights == "random":
            problems.append("EDC fine-tunes pretrained weights: backbone_weights must be 'imagenet' or a weights file")
        if problems:
            raise ValueError("EDCSettings: " + "; ".join(problems))

    def resume_key(self) -> dict[str, Any]:
        """The settings a checkpoint must share with this run to be resumed (all but ``steps``)."""
        key = dataclasses.asdict(self)
        key.pop("steps")
        key["stages"] = [str(stage) for stage in self.stages]
        return key


def global_cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``1 − cos`` between each item's whole flattened map in ``a`` and ``b``, averaged over the batch."""
    return 1.0 - torch.cosine_similarity(a.flatten(1), b.flatten(1), dim=1).mean()


def initial_encoder_state(backbone: str, weights: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Starting weights of the whole timm model ``backbone``.

    Args:
        backbone: timm model name.
        weights: ``"imagenet"`` (offline package for EfficientNet-Lite0, timm's download for others) or a
            weights file read with :func:`~simpleslicenet.models.backbones.load_weights_file`.

    Raises:
        BackboneWeightsError: If ImageNet weights cannot be obtained or the file cannot be read.
    """
    from simpleslicenet.models.backbones import (
        OFFLINE_IMAGENET_BACKBONES,
        BackboneWeightsError,
        load_imagenet_state_dict,
        load_weights_file,
    )

    if str(weights) != "imagenet":
        return load_weights_file(weights)
    if backbone in OFFLINE_IMAGENET_BACKBONES:
        return load_imagenet_state_dict(backbone)
    import timm

    try:
        return timm.create_model(backbone, pretrained=True).state_dict()
    except Exception as error:
        msg = (
            f"ImageNet weights for {backbone!r} could not be downloaded ({type(error).__name__}); pass a local "
            "weights file as backbone_weights, or use the offline backbone 'tf_efficientnet_lite0'"
        )
        raise BackboneWeightsError(msg) from error


def _state_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha1()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _set_bn_momentum(module: nn.Module, momentum: float) -> None:
    for layer in module.modules():
        if isinstance(layer, _BatchNorm):
            layer.momentum = momentum


@dataclass
class LossTerms:
    """One forward pass of :class:`EDCNetwork`."""

    loss: torch.Tensor
    stage_losses: list[float]
    anchor: float | None


class EDCNetwork(nn.Module):
    """Trainable encoder, its decoder, and a frozen copy of the starting encoder.

    Args:
        settings: The run's settings (backbone, stages, batch-norm momentum, anchor weight, seed).
        encoder_state: Starting weights of the whole timm model (:func:`initial_encoder_state`).

    Raises:
        BackboneWeightsError: If ``encoder_state`` does not load strictly into the backbone.
        ValueError: If a stage is not shallower than the bottleneck or the model has no
            ``forward_intermediates``.
    """

    def __init__(self, settings: EDCSettings, encoder_state: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        import timm

        from simpleslicenet.models.backbones import BackboneWeightsError, resolve_out_indices

        # The whole model (not a features_only wrapper) keeps timm's own parameter names, so its
        # state dict is the weights file; exportable=True as in the models' feature extractors.
        self.encoder = timm.create_model(settings.backbone, pretrained=False, exportable=True)
        try:
            self.encoder.load_state_dict(dict(encoder_state), strict=True)
        except RuntimeError as error:
            msg = f"starting weights do not fit {settings.backbone} strictly: {str(error).splitlines()[0]}"
            raise BackboneWeightsError(msg) from error
        if not hasattr(self.encoder, "forward_intermediates"):
            msg = f"{settings.backbone}: timm model without forward_intermediates(), cannot read its stages"
            raise ValueError(msg)
        info = list(self.encoder.feature_info)
        self.bottleneck_index = len(info) - 1
        self.stage_indices = tuple(sorted(set(resolve_out_indices(settings.backbone, list(settings.stages)))))
        if min(self.stage_indices) < 0 or max(self.stage_indices) >= self.bottleneck_index:
            msg = (
                f"stages {settings.stages} of {settings.backbone}: each must be a feature index in "
                f"0..{self.bottleneck_index - 1}, shallower than the bottleneck {info[-1]['module']}"
            )
            raise ValueError(msg)
        self.anchor_weight = float(settings.anchor_weight)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            self.decoder = FeatureDecoder(
                in_channels=int(info[-1]["num_chs"]),
                out_channels=[int(info[i]["num_chs"]) for i in self.stage_indices],
            )
        _set_bn_momentum(self.encoder, settings.bn_momentum)
        _set_bn_momentum(self.decoder, settings.bn_momentum)
        self.reference = copy.deepcopy(self.encoder).requires_grad_(False)
        # Momentum 0: in training mode the copy normalises with batch statistics like the encoder,
        # but its running statistics stay the starting ones.
        _set_bn_momentum(self.reference, 0.0)

    def encode(self, images: torch.Tensor, frozen: bool = False) -> list[torch.Tensor]:
        """The maps of the rebuilt stages followed by the bottleneck map.

        Args:
            images: ``[N, 3, H, W]``, ImageNet-normalised.
            frozen: Use the frozen starting copy instead of the trained encoder.
        """
        model = self.reference if frozen else self.encoder
        return model.forward_intermediates(
            images, indices=[*self.stage_indices, self.bottleneck_index], intermediates_only=True, stop_early=True
        )

    def forward(self, images: torch.Tensor) -> LossTerms:
        """Loss of one batch: reconstruction of the detached stage maps from the bottleneck (+ anchor)."""
        maps = self.encode(images)
        targets, bottleneck = maps[:-1], maps[-1]
        rebuilt = self.decoder(bottleneck, [tuple(t.shape[-2:]) for t in targets])
        # Stop-gradient on the targets: the encoder is trained only through the bottleneck.
        stage_losses = [global_cosine_distance(d, t.detach()) for d, t in zip(rebuilt, targets, strict=True)]
        loss = torch.stack(stage_losses).sum()
        anchor = None
        if self.anchor_weight > 0:
            with torch.no_grad():
                start = self.encode(images, frozen=True)
            anchor_term = torch.stack([global_cosine_distance(m, s) for m, s in zip(maps, start, strict=True)]).sum()
            loss = loss + self.anchor_weight * anchor_term
            anchor = float(anchor_term.detach())
        return LossTerms(loss=loss, stage_losses=[float(s.detach()) for s in stage_losses], anchor=anchor)

    @torch.no_grad()
    def drift(self, images: torch.Tensor) -> float:
        """Mean ``1 − cos`` between the encoder's and the starting encoder's maps, both in eval mode.

        Eval mode is how the downstream models run the encoder; nothing is updated here.
        """
        was_training = self.training
        self.eval()
        try:
            now, start = self.encode(images), self.encode(images, frozen=True)
            return float(torch.stack([global_cosine_distance(a, b) for a, b in zip(now, start, strict=True)]).mean())
        finally:
            self.train(was_training)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Encoder and decoder parameters (the frozen copy has none)."""
        return [p for p in self.parameters() if p.requires_grad]

    def make_optimizer(self, settings: EDCSettings) -> torch.optim.Optimizer:
        """AdamW with EDC's two learning rates: a low one for the encoder, a higher one for the decoder."""
        return torch.optim.AdamW(
            [
                {"params": list(self.encoder.parameters()), "lr": settings.lr_encoder},
                {"params": list(self.decoder.parameters()), "lr": settings.lr_decoder},
            ],
            lr=settings.lr_decoder,
            weight_decay=settings.weight_decay,
        )


@dataclass
class EDCResult:
    """What :func:`train_edc` produced.

    Attributes:
        weights: The encoder weights file (``backbone_weights=`` of the models).
        checkpoint: The resume checkpoint.
        loss_curve: The loss curve PNG.
        summary: The JSON summary.
        steps: Steps trained in total.
        resumed_from: Step the run continued from (0: fresh start).
        history: ``loss`` per step, ``stage_loss`` per step, ``drift_step``/``drift``, ``anchor``.
    """

    weights: Path
    checkpoint: Path
    loss_curve: Path
    summary: Path
    steps: int
    resumed_from: int
    history: dict[str, list] = field(default_factory=dict)


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _check_resume(saved: Mapping[str, Any], expected: Mapping[str, Any], path: Path) -> None:
    differences = [
        f"{name}: checkpoint {saved.get(name)!r}, now {value!r}"
        for name, value in expected.items()
        if saved.get(name) != value
    ]
    if differences:
        msg = (
            f"{path}: checkpoint of a different run ({'; '.join(differences)}). Use the same settings and data "
            "to resume, or pass --restart (restart=True) to start again."
        )
        raise EDCResumeError(msg)


def _empty_history() -> dict[str, list]:
    return {"loss": [], "stage_loss": [], "anchor": [], "drift_step": [], "drift": []}


def train_edc(
    slices: NormalSlices,
    out: str | os.PathLike,
    settings: EDCSettings | None = None,
    *,
    checkpoint_every: int = 100,
    drift_every: int = 50,
    device: str = "auto",
    restart: bool = False,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> EDCResult:
    """Fine-tune ``settings.backbone`` with EDC on ``slices`` and write the encoder weights to ``out``.

    Args:
        slices: Normal training slices (:func:`~simpleslicenet.training.data.load_normal_slices`).
        out: Encoder weights file, ``.pth``/``.pt`` or ``.safetensors``; the checkpoint, loss curve and
            summary go beside it (:func:`~simpleslicenet.training.outputs.output_paths`).
        settings: Run settings; ``None`` for EDC's Br35H defaults.
        checkpoint_every: Save the resume checkpoint (and redraw the loss curve) every this many steps.
        drift_every: Measure the drift from the starting encoder every this many steps.
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``, ... A run resumes bit for bit on
            the same CPU set-up; GPU kernels may differ in the last bits.
        restart: Ignore an existing checkpoint and start from the starting weights.
        progress: Show a tqdm progress bar.
        on_step: Called as ``on_step(step, loss)`` after each step (and after its checkpoint, if any).

    Returns:
        Paths of the written files and the loss history.

    Raises:
        EDCResumeError: If a checkpoint beside ``out`` belongs to another run or is past ``settings.steps``.
        BackboneWeightsError: If the starting weights cannot be had or the written file does not load strictly.
        ValueError: For an invalid output name or stage list.
    """
    from tqdm.auto import tqdm

    settings = settings or EDCSettings()
    if checkpoint_every < 1 or drift_every < 1:
        msg = f"checkpoint_every and drift_every must be positive, got {checkpoint_every}, {drift_every}"
        raise ValueError(msg)
    paths = output_paths(Path(out))
    run_device = _resolve_device(device)
    start_state = initial_encoder_state(settings.backbone, settings.backbone_weights)
    network = EDCNetwork(settings, start_state)
    key = {
        "settings": settings.resume_key(),
        "weights_sha1": _state_fingerprint(start_state),
        "data_sha1": slices.fingerprint(),
        "n_slices": len(slices),
    }
    del start_state
    network.to(run_device)
    optimizer = network.make_optimizer(settings)
    history, start_step, seconds = _empty_history(), 0, 0.0
    if paths["checkpoint"].exists() and not restart:
        saved = load_checkpoint(paths["checkpoint"])
        _check_resume(saved["key"], key, paths["checkpoint"])
        if saved["step"] > settings.steps:
            msg = f"{paths['checkpoint']}: already at step {saved['step']}, more than steps={settings.steps}; pass --restart"
            raise EDCResumeError(msg)
        network.encoder.load_state_dict(saved["encoder"])
        network.decoder.load_state_dict(saved["decoder"])
        optimizer.load_state_dict(saved["optimizer"])
        history, start_step, seconds = saved["history"], int(saved["step"]), float(saved["seconds"])
        logger.info("EDC: resuming %s from step %d", paths["checkpoint"], start_step)
    title = f"EDC {settings.backbone}, {len(slices)} slices {slices.image_size[0]}×{slices.image_size[1]}"

    def checkpoint(step: int) -> None:
        save_checkpoint(
            paths["checkpoint"],
            {
                "key": key,
                "step": step,
                "seconds": seconds,
                "encoder": network.encoder.state_dict(),
                "decoder": network.decoder.state_dict(),
                "optimizer": optimizer.state_dict(),
                "history": history,
            },
        )
        write_loss_curve(history, paths["loss_curve"], title)

    network.train()
    bar = tqdm(total=settings.steps, initial=start_step, desc="EDC", unit="step", disable=not progress, dynamic_ncols=True)
    parameters = network.trainable_parameters()
    for step in range(start_step, settings.steps):
        began = time.perf_counter()
        images = slices.batch(slices.indices_for_step(step, settings.batch_size, settings.seed)).to(run_device)
        terms = network(images)
        if not math.isfinite(float(terms.loss.detach())):
            msg = f"EDC: loss became {float(terms.loss.detach())} at step {step + 1}; lower the learning rates"
            raise FloatingPointError(msg)
        optimizer.zero_grad(set_to_none=True)
        terms.loss.backward()
        if settings.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(parameters, settings.grad_clip)
        optimizer.step()
        done = step + 1
        loss = float(terms.loss.detach())
        history["loss"].append(loss)
        history["stage_loss"].append(terms.stage_losses)
        history["anchor"].append(terms.anchor)
        if done % drift_every == 0 or done == settings.steps:
            history["drift_step"].append(done)
            history["drift"].append(network.drift(images))
        seconds += time.perf_counter() - began
        if done % checkpoint_every == 0 or done == settings.steps:
            checkpoint(done)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if on_step is not None:
            on_step(done, loss)
    bar.close()
    if start_step == settings.steps:
        write_loss_curve(history, paths["loss_curve"], title)

    save_encoder_weights(
        network.encoder.state_dict(),
        paths["weights"],
        metadata={"backbone": settings.backbone, "method": "EDC", "steps": str(settings.steps)},
    )
    n_tensors = check_encoder_weights(paths["weights"], settings.backbone)
    tail = history["loss"][-min(50, len(history["loss"])) :]
    write_summary(
        paths["summary"],
        {
            "method": "EDC (Guo et al., IEEE TMI 2023)",
            "weights": paths["weights"].name,
            "tensors": n_tensors,
            "settings": dataclasses.asdict(settings),
            "stage_indices": list(network.stage_indices),
            "bottleneck_index": network.bottleneck_index,
            "data": {"source": slices.source, "n_slices": len(slices), "image_size": list(slices.image_size), "sha1": key["data_sha1"]},
            "starting_weights_sha1": key["weights_sha1"],
            "steps": settings.steps,
            "resumed_from": start_step,
            "train_seconds": seconds,
            "device": str(run_device),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "machine": platform.machine(),
            "first_loss": history["loss"][0] if history["loss"] else None,
            "final_loss_mean_last_50": sum(tail) / len(tail) if tail else None,
            "final_drift": history["drift"][-1] if history["drift"] else None,
            "history": history,
        },
    )
    return EDCResult(
        weights=paths["weights"],
        checkpoint=paths["checkpoint"],
        loss_curve=paths["loss_curve"],
        summary=paths["summary"],
        steps=settings.steps,
        resumed_from=start_step,
        history=history,
    )

