"""The volume handling every slice-wise model gets on top of its anomalib image model (see the package docs)."""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib.models.components.feature_extractors import TimmFeatureExtractor
from anomalib.pre_processing import PreProcessor

from simpleslicenet.data.batch import take_rows
from simpleslicenet.models.backbones import (
    DEFAULT_BACKBONE,
    BackboneWeightsError,
    apply_imagenet_weights,
    imagenet_pre_processor,
    load_state_into,
    load_weights_file,
)
from simpleslicenet.models.scoring import VolumeScoring
from simpleslicenet.models.volume_model import VolumeModelMixin

__all__ = ["SliceWiseMixin", "load_offline_weights", "BACKBONE_WEIGHTS"]

logger = logging.getLogger(__name__)

BACKBONE_WEIGHTS = ("imagenet", "random")


def load_offline_weights(model: torch.nn.Module, owner: str, weights: str | os.PathLike = "imagenet") -> list[str]:
    """Load bundled ImageNet weights (or a weights file) into every frozen timm feature extractor inside ``model``.

    Trainable extractors (e.g. STFPM's student) keep their random start, as in the original methods.

    Args:
        model: The wrapped torch model.
        owner: Class name used in error messages.
        weights: ``"imagenet"`` or a ``.pth``/``.safetensors`` file of the backbone (e.g. an EDC-tuned encoder).

    Returns:
        The backbone names that received weights.

    Raises:
        ValueError: If the model has no timm feature extractor, or a backbone has no bundled weights.
    """
    state = None if weights == "imagenet" else load_weights_file(weights)
    loaded = []
    for module in model.modules():
        if not isinstance(module, TimmFeatureExtractor) or module.requires_grad:
            continue
        if not isinstance(module.backbone, str):
            continue
        try:
            # A features_only network lacks the classifier head; every tensor it has must be filled.
            if state is None:
                apply_imagenet_weights(module.feature_extractor, module.backbone)
            else:
                load_state_into(module.feature_extractor, state, str(weights))
        except BackboneWeightsError as error:
            msg = f"{owner}: {error}; use backbone={DEFAULT_BACKBONE!r} or pass backbone_weights='random'"
            raise ValueError(msg) from error
        loaded.append(module.backbone)
    if not loaded:
        msg = f"{owner}: found no frozen timm feature extractor to load ImageNet weights into; pass backbone_weights='random'"
        raise ValueError(msg)
    return loaded


class SliceWiseMixin(VolumeModelMixin):
    """Adds volume handling to an anomalib image model; put it first in the bases (see :func:`slicewise`).

    Args:
        train_slice_stride: Train on every k-th slice of each volume (``1``: all slices).
        brain_slices_only: Train only on slices that contain brain.
        volume_score_mode: ``"max"`` or ``"topk_mean"`` of the volume's voxel map inside the brain.
        topk_fraction: Share of brain voxels averaged in ``"topk_mean"`` mode.
        backbone_weights: ``"imagenet"`` (bundled offline weights), ``"random"``, or a ``.pth``/``.safetensors``
            file of the backbone (e.g. from ``simpleslicenet edc``).
        image_size: Resize slices to ``(H, W)`` in the pre-processor (``None``: keep slice size).
            Models such as FastFlow and Reverse Distillation need a fixed size.
        **kwargs: Arguments of the wrapped anomalib model.
    """

    def __init__(
        self,
        *,
        train_slice_stride: int = 1,
        brain_slices_only: bool = True,
        volume_score_mode: str = "max",
        topk_fraction: float = 0.001,
        backbone_weights: str = "imagenet",
        image_size: Sequence[int] | None = None,
        **kwargs,
    ) -> None:
        name = type(self).__name__
        if int(train_slice_stride) < 1:
            msg = f"{name}: train_slice_stride must be >= 1, got {train_slice_stride}"
            raise ValueError(msg)
        backbone_weights = os.fspath(backbone_weights)
        if backbone_weights not in BACKBONE_WEIGHTS and not Path(backbone_weights).is_file():
            msg = f"{name}: backbone_weights must be one of {BACKBONE_WEIGHTS} or a weights file, got {backbone_weights!r}"
            raise ValueError(msg)
        parameters = inspect.signature(super().__init__).parameters
        if "pre_trained" in parameters:
            # timm would download weights from the model hub; bundled ones are loaded below instead.
            kwargs["pre_trained"] = False
        if image_size is not None and kwargs.get("pre_processor", True) is True:
            kwargs["pre_processor"] = self.configure_pre_processor(tuple(image_size))
        try:
            super().__init__(**kwargs)
        except ValueError as error:
            if image_size is None and "input size" in str(error):
                msg = f"{name}: {error} Pass image_size=(H, W), e.g. the datamodule's slice size."
                raise ValueError(msg) from error
            raise
        self.train_slice_stride = int(train_slice_stride)
        self.brain_slices_only = bool(brain_slices_only)
        self.scoring = VolumeScoring(volume_score_mode, topk_fraction)
        self.backbone_weights = backbone_weights
        if backbone_weights != "random":
            loaded = load_offline_weights(self.model, name, backbone_weights)
            logger.info("%s: %s weights loaded into %s", name, backbone_weights, ", ".join(loaded))

    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | None = None) -> PreProcessor:
        """ImageNet normalisation of the ``[0, 1]`` slices; no resize unless ``image_size`` is given.

        Args:
            image_size: Optional ``(H, W)`` to resize slices to before normalising.
        """
        return imagenet_pre_processor(image_size)

    def training_slices(self, batch: Any) -> Any:  # noqa: ANN401
        """The rows of ``batch`` used for training: brain slices, every ``train_slice_stride``-th one."""
        keep = torch.ones(batch.batch_size, dtype=torch.bool, device=batch.image.device)
        slice_index = getattr(batch, "slice_index", None)
        if slice_index is not None and self.train_slice_stride > 1:
            keep &= slice_index % self.train_slice_stride == 0
        brain_mask = getattr(batch, "brain_mask", None)
        if brain_mask is not None and self.brain_slices_only:
            has_brain = brain_mask.flatten(1).any(dim=1)
            # A volume with no brain slice on the stride grid still contributes its brain slices.
            keep = keep & has_brain if (keep & has_brain).any() else has_brain
        if keep.all() or not keep.any():
            return batch
        return take_rows(batch, keep)

    def training_step(self, batch: Any, *args, **kwargs) -> Any:  # noqa: ANN401
        """The wrapped model's training step on the selected slices only."""
        return super().training_step(self.training_slices(batch), *args, **kwargs)

    def validation_step(self, batch: Any, *args, **kwargs) -> Any:  # noqa: ANN401
        """The wrapped model's per-slice predictions plus the volume score."""
        return self.score_batch(super().validation_step(batch, *args, **kwargs))

    def test_step(self, batch: Any, *args, **kwargs) -> Any:  # noqa: ANN401
        """The wrapped model's per-slice predictions plus the volume score."""
        return self.score_batch(super().test_step(batch, *args, **kwargs))

    def predict_step(self, batch: Any, *args, **kwargs) -> Any:  # noqa: ANN401
        """The wrapped model's per-slice predictions plus the volume score."""
        return self.score_batch(super().predict_step(batch, *args, **kwargs))
