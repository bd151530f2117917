"""SimpleSliceNet: efficient slice anomaly detection for 3-D brain MRI volumes (Lightning module).

A frozen 2-D ImageNet backbone embeds every axial slice; neighbourhood-averaged, channel-pooled
features of neighbouring slices are averaged in depth and a conditional normalizing flow learns
their density on healthy volumes, contrasted with Gaussian-noised copies. Unlikely locations form
the anomaly map, upsampled to the volume and smoothed in 3-D.

Example:
    >>> from simpleslicenet.models.simpleslicenet import SimpleSliceNet
    >>> model = SimpleSliceNet(flow_blocks=2)
    >>> model.model.feature_dim
    152

Paper:
    Title: Efficient Slice Anomaly Detection Network for 3D Brain MRI Volume
    Authors: Zhang, Mohsenzadeh
    URL: https://arxiv.org/abs/2408.15958
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn, optim

from simpleslicenet.models.backbones import DEFAULT_BACKBONE, imagenet_pre_processor
from simpleslicenet.models.scoring import VolumeScoring, slice_scores
from simpleslicenet.models.volume_model import VolumeModelMixin

from .loss import add_feature_noise, create_loss
from .torch_model import SimpleSliceNetModel

__all__ = ["SimpleSliceNet", "fit_flow_on_features"]

logger = logging.getLogger(__name__)

MODES = ("auto", "3d", "2d")


def fit_flow_on_features(
    flow: nn.Module,
    loss_function: nn.Module,
    features: torch.Tensor,
    conditions: torch.Tensor,
    optimizer: optim.Optimizer,
    features_per_step: int = 4096,
    noise_std: float | Sequence[float] = 0.08,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
) -> torch.Tensor:
    """One pass over a batch's features in random order, one optimiser step per ``features_per_step``.

    Each step puts the normal features and their noised copies through the flow together and
    applies ``loss_function(normal_log_likelihood, noised_log_likelihood)``.

    Args:
        flow: :class:`~simpleslicenet.models.simpleslicenet.flow.ConditionalFlow`.
        loss_function: Loss on paired per-dimension log-likelihoods.
        features: ``[M, C]`` flow inputs (no gradient).
        conditions: ``[M, P]`` their conditions.
        optimizer: Optimiser of the flow.
        features_per_step: Features per step (the last step takes the rest).
        noise_std: ``σ`` of the pseudo-anomaly noise, or several to mix.
        backward: How to back-propagate (Lightning's ``manual_backward`` inside a Trainer).

    Returns:
        Mean loss over the steps (detached).
    """
    order = torch.randperm(features.shape[0], device=features.device)
    losses = []
    for chunk in order.split(features_per_step):
        normal = features[chunk]
        condition = conditions[chunk]
        noised = add_feature_noise(normal, noise_std)
        # Normal features and their noised copies in one flow pass.
        log_likelihood = flow.log_likelihood(torch.cat([normal, noised]), condition.repeat(2, 1))
        normal_ll, noised_ll = log_likelihood.split(normal.shape[0])
        loss = loss_function(normal_ll, noised_ll)
        optimizer.zero_grad()
        backward(loss)
        optimizer.step()
        losses.append(loss.detach())
    return torch.stack(losses).mean()


class SimpleSliceNet(VolumeModelMixin, AnomalibModule):
    """SimpleSliceNet as an anomalib one-class model.

    A batch is a :class:`~simpleslicenet.data.batch.VolumeBatch` of one or more whole volumes (their
    slices in order); depth cells never mix volumes. In ``"2d"`` mode (or ``"auto"`` on a batch
    without ``volume_index``) it trains and predicts on independent images, without depth aggregation.

    Args:
        backbone: timm backbone (offline default ``tf_efficientnet_lite0``; paper ``wide_resnet50_2``).
        layers: Backbone stages by name (``["layer2", "layer3"]``) or feature-info index; ``None``:
            the stride-8 and stride-16 stages.
        backbone_weights: ``"imagenet"``, a local ``.pth``/``.safetensors`` file, or ``"random"``.
        embed_dim: Feature size per location (paper: 512); ``None`` concatenates the stages' channels.
        depth_window: Slices averaged per depth cell (paper: 3).
        depth_stride: Slices between depth cells (paper: 3; 1 keeps full depth resolution).
        flow_blocks: Coupling blocks of the flow (paper: 8).
        clamp: Affine clamping of the couplings (paper: 1.9).
        condition_dim: Size of the 2-D sinusoidal position code (paper: 128).
        depth_position: Also condition the flow on the depth of each cell.
        noise_std: ``σ`` of the Gaussian noise that makes pseudo-anomalous features (paper: 0.08), or
            a list of ``σ`` to mix.
        loss: ``"bgspp"`` (the paper's boundary-guided semi-push-pull, arXiv v1), ``"triplet"`` (this
            package's per-feature margin) or ``"authors_triplet"`` (the authors' final code: one
            triplet margin between whole likelihood vectors); see :mod:`.loss`.
        lr: Adam learning rate of the flow (paper: 1e-3).
        features_per_step: Features per flow optimisation step (paper: 4096); every feature of the
            batch is used once per training step, in random order.
        smoothing_sigma: 3-D Gaussian smoothing of the map in voxels (paper: 4).
        volume_score_mode: ``"max"`` or ``"topk_mean"`` of the brain-masked voxel map.
        topk_fraction: Share of brain voxels averaged in ``"topk_mean"`` mode.
        mode: ``"auto"``, ``"3d"`` or ``"2d"``.
        channels_last: Channels-last layout for the backbone and its input (faster convolutions on GPUs).
        compile_mode: ``torch.compile`` the slice encoder and the flow with this mode (e.g. ``"default"``);
            ``None``: eager. For bf16, train and test with the trainer's ``precision="bf16-mixed"``: the
            encoder then runs in bf16 while the flow and the map stay float32.
        pre_processor: Pre-processor, or ``True`` for ImageNet normalisation only.
        post_processor: Post-processor, or ``True`` for anomalib's default.
        evaluator: Evaluator, or ``True`` for anomalib's default.
        visualizer: Visualizer, or ``True`` for none (anomalib's image visualizer cannot open NIfTI).
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        layers: Sequence[str | int] | None = None,
        backbone_weights: str | os.PathLike | None = "imagenet",
        embed_dim: int | None = None,
        depth_window: int = 3,
        depth_stride: int = 3,
        flow_blocks: int = 8,
        clamp: float = 1.9,
        condition_dim: int = 128,
        depth_position: bool = False,
        noise_std: float | Sequence[float] = 0.08,
        loss: str = "bgspp",
        lr: float = 1e-3,
        features_per_step: int = 4096,
        smoothing_sigma: float = 4.0,
        volume_score_mode: str = "max",
        topk_fraction: float = 0.001,
        mode: str = "auto",
        channels_last: bool = False,
        compile_mode: str | None = None,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        if mode == "2d":
            # Plain images carry no brain mask or volume index: anomalib's own image/pixel metrics and
            # its normalising, thresholding post-processor, as for any anomalib image model.
            evaluator = AnomalibModule.configure_evaluator() if evaluator is True else evaluator
            post_processor = PostProcessor() if post_processor is True else post_processor
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        if mode not in MODES:
            msg = f"unknown mode {mode!r}: use one of {MODES}"
            raise ValueError(msg)
        self.scoring = VolumeScoring(volume_score_mode, topk_fraction)
        if features_per_step < 2:
            msg = f"features_per_step must be at least 2, got {features_per_step}"
            raise ValueError(msg)
        self.model = SimpleSliceNetModel(
            backbone=backbone,
            layers=layers,
            backbone_weights=backbone_weights,
            embed_dim=embed_dim,
            depth_window=depth_window,
            depth_stride=depth_stride,
            flow_blocks=flow_blocks,
            clamp=clamp,
            condition_dim=condition_dim,
            depth_position=depth_position,
            smoothing_sigma=smoothing_sigma,
            volumetric=mode != "2d",
            channels_last=channels_last,
            compile_mode=compile_mode,
        )
        self.loss = create_loss(loss)
        self.noise_std = list(noise_std) if isinstance(noise_std, Sequence) else float(noise_std)
        self.learning_rate = lr
        self.features_per_step = features_per_step
        self.mode = mode
        # Several flow steps per volume: the loop lives in training_step.
        self.automatic_optimization = False

    # ------------------------------------------------------------------------------- batch layout
    def _volume_rows(self, batch: Batch) -> list[tuple[int, slice]] | None:
        """Each volume's ``(index, rows)`` in the batch, or ``None`` when its rows are independent images."""
        if self.mode == "2d":
            return None
        has_volumes = getattr(batch, "volume_index", None) is not None
        if has_volumes:
            return batch.volumes()
        if self.mode == "3d":
            return [(0, slice(0, batch.image.shape[0]))]
        return None

    # ----------------------------------------------------------------------------------- training
    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Extract the batch's features once, then take one flow step per ``features_per_step`` of them.

        Args:
            batch: Slices of whole healthy volumes (or independent images in 2-D mode).
            args: Unused.
            kwargs: Unused.

        Returns:
            The mean loss over the flow steps.
        """
        del args, kwargs
        volumes = self._volume_rows(batch)
        features, conditions = self.model.training_features(
            batch.image,
            None if volumes is None else [rows for _, rows in volumes],
        )
        mean_loss = fit_flow_on_features(
            self.model.flow,
            self.loss,
            features,
            conditions,
            self.optimizers(),
            features_per_step=self.features_per_step,
            noise_std=self.noise_std,
            backward=self.manual_backward,
        )
        self.log("train_loss", mean_loss, on_epoch=True, prog_bar=True, logger=True, batch_size=1)
        return {"loss": mean_loss}

    def configure_optimizers(self) -> optim.Optimizer:
        """Adam on the flow only; the backbone is frozen."""
        parameters = [p for p in self.model.flow.parameters() if p.requires_grad]
        return optim.Adam(parameters, lr=self.learning_rate)

    # ---------------------------------------------------------------------------------- inference
    def _predict(self, batch: Batch) -> Batch:
        """Raw maps of every volume (depth cells never mix volumes), then the shared scoring step."""
        volumes = self._volume_rows(batch)
        if volumes is None:
            predictions = self.model.predict_images(batch.image)
            return batch.update(pred_score=predictions.pred_score, anomaly_map=predictions.anomaly_map)
        anomaly_map = torch.cat([self.model.predict_volume(batch.image[rows]) for _, rows in volumes])
        return self.score_batch(batch.update(anomaly_map=anomaly_map, pred_score=slice_scores(anomaly_map)))

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Predict every volume of the batch (see :meth:`_predict`)."""
        del args, kwargs
        return self._predict(batch)

    def test_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Predict every volume of the batch (see :meth:`_predict`)."""
        del args, kwargs
        return self._predict(batch)

    def predict_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Predict every volume of the batch (see :meth:`_predict`)."""
        del args, kwargs
        return self._predict(batch)

    # ----------------------------------------------------------------------------- configuration
    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | None = None) -> PreProcessor:
        """ImageNet normalisation only; slices already have the model grid's size.

        Args:
            image_size: Resize to this size first (for plain 2-D image datasets); ``None``: no resize.
        """
        return imagenet_pre_processor(image_size)

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No sanity validation: thresholds and normalisation come from a full validation epoch."""
        return {"num_sanity_val_steps": 0}

    @property
    def learning_type(self) -> LearningType:
        """One-class: trained on healthy volumes only."""
        return LearningType.ONE_CLASS
