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

This module holds the run's settings and its network. The Lightning module that trains it is
:class:`~simpleslicenet.training.edc_module.EDCModule`; :func:`~simpleslicenet.training.edc_run.train_edc`
runs it with a Lightning ``Trainer`` (``max_steps``, ``gradient_clip_val``, ``ModelCheckpoint``, resume
with ``ckpt_path``).

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
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import timm
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from simpleslicenet.models.backbones import (
    OFFLINE_IMAGENET_BACKBONES,
    BackboneWeightsError,
    load_imagenet_state_dict,
    load_weights_file,
    resolve_out_indices,
)
from simpleslicenet.training.decoder import FeatureDecoder

__all__ = [
    "EDCNetwork",
    "EDCResumeError",
    "EDCSettings",
    "LossTerms",
    "global_cosine_distance",
    "initial_encoder_state",
    "state_fingerprint",
]


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
    if str(weights) != "imagenet":
        return load_weights_file(weights)
    if backbone in OFFLINE_IMAGENET_BACKBONES:
        return load_imagenet_state_dict(backbone)
    try:
        return timm.create_model(backbone, pretrained=True).state_dict()
    except Exception as error:
        msg = (
            f"ImageNet weights for {backbone!r} could not be downloaded ({type(error).__name__}); pass a local "
            "weights file as backbone_weights, or use the offline backbone 'tf_efficientnet_lite0'"
        )
        raise BackboneWeightsError(msg) from error


def state_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-1 of a state dict's names and values; a resumed run must start from the same weights."""
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
