"""Lightning module of the 3D convolutional autoencoder baseline.

The datamodule hands over a volume as a batch of its axial slices; this module folds each volume
back into ``[1, 1, D, H, W]``, trains the autoencoder to reconstruct healthy volumes (loss inside the
brain only) and scores a test volume by its smoothed reconstruction error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn

from simpleslicenet.data.batch import VolumeBatch
from simpleslicenet.models.scoring import VolumeScoring
from simpleslicenet.models.volume_model import VolumeModelMixin

from .torch_model import AutoEncoder3dModel, masked_reconstruction_loss

__all__ = ["AE3D"]

LOSSES = ("l1", "mse")


class AE3D(VolumeModelMixin, AnomalibModule):
    """3D convolutional autoencoder for unsupervised anomaly detection in brain MRI volumes.

    Args:
        widths: Channels of the stride-2 encoder blocks; the decoder mirrors them.
        latent_channels: Channels of the spatial bottleneck (at ``1 / 2**len(widths)`` resolution).
        norm: ``"instance"`` (default; one volume a batch), ``"batch"`` or ``"none"``.
        loss: ``"l1"`` or ``"mse"`` reconstruction loss, averaged over brain voxels.
        lr: Adam learning rate.
        sigma: Gaussian smoothing of the residual map, in voxels (``0``: none).
        volume_score_mode: ``"max"`` or ``"topk_mean"`` of the voxel map inside the brain.
        topk_fraction: Share of brain voxels averaged in ``"topk_mean"`` mode.
        pre_processor: Pre-processor, or ``True`` for the default (identity: slices are already in ``[0, 1]``).
        post_processor: Post-processor or flag.
        evaluator: Evaluator or flag.
        visualizer: Visualizer or flag (``True``: NIfTI anomaly maps, see :class:`~simpleslicenet.visualization.VolumeMapWriter`).

    Example:
        >>> from anomalib.engine import Engine
        >>> from simpleslicenet.models.ae3d import AE3D
        >>> model = AE3D(widths=(16, 32, 64, 128), latent_channels=16)
        >>> engine = Engine(max_epochs=50)
        >>> engine.fit(model=model, datamodule=datamodule)  # doctest: +SKIP
    """

    def __init__(
        self,
        widths: Sequence[int] = (16, 32, 64, 128),
        latent_channels: int = 16,
        norm: str = "instance",
        loss: str = "l1",
        lr: float = 1e-3,
        sigma: float = 2.0,
        volume_score_mode: str = "max",
        topk_fraction: float = 0.001,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        super().__init__(
            pre_processor=pre_processor, post_processor=post_processor, evaluator=evaluator, visualizer=visualizer
        )
        if loss not in LOSSES:
            msg = f"AE3D: loss must be one of {LOSSES}, got {loss!r}"
            raise ValueError(msg)
        self.model = AutoEncoder3dModel(widths=widths, latent_channels=latent_channels, norm=norm, sigma=sigma)
        self.loss_name = loss
        self.lr = lr
        self.scoring = VolumeScoring(volume_score_mode, topk_fraction)

    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | None = None) -> PreProcessor:
        """Identity pre-processor: the autoencoder reconstructs the ``[0, 1]`` grey values themselves.

        Args:
            image_size: Not supported; a volume keeps its grid.
        """
        if image_size is not None:
            msg = "AE3D reconstructs volumes on their own grid; resize them in the datamodule (target_shape)"
            raise ValueError(msg)
        return PreProcessor(transform=None)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam on all autoencoder weights."""
        return torch.optim.Adam(self.model.parameters(), lr=self.lr)

    @staticmethod
    def _volumes(batch: Batch) -> list[slice]:
        """Row ranges of the volumes in ``batch`` (a plain image batch counts as one volume)."""
        if isinstance(batch, VolumeBatch):
            return [rows for _, rows in batch.volumes()]
        return [slice(0, batch.batch_size)]

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Reconstruct each volume of the batch; L1/MSE over its brain voxels."""
        del args, kwargs  # These variables are not used.
        brain_mask = getattr(batch, "brain_mask", None)
        volumes, masks = [], []
        for rows in self._volumes(batch):
            volumes.append(AutoEncoder3dModel.fold(batch.image[rows]))
            masks.append(brain_mask[rows][None, None] if brain_mask is not None else None)
        if len({v.shape for v in volumes}) == 1:
            # Volumes of one grid are reconstructed together.
            volume = torch.cat(volumes)
            mask = torch.cat(masks) if brain_mask is not None else None
            loss = masked_reconstruction_loss(volume, self.model.reconstruct(volume), mask, self.loss_name)
        else:
            losses = [
                masked_reconstruction_loss(v, self.model.reconstruct(v), m, self.loss_name)
                for v, m in zip(volumes, masks, strict=True)
            ]
            loss = torch.stack(losses).mean()
        self.log("train_loss", loss.detach(), on_step=False, on_epoch=True, prog_bar=True, batch_size=len(volumes))
        return {"loss": loss}

    def _predict(self, batch: Batch) -> Batch:
        """Raw residual maps of every volume in ``batch``, then the shared scoring step."""
        predictions = [self.model(batch.image[rows]) for rows in self._volumes(batch)]
        batch = batch.update(
            anomaly_map=torch.cat([p.anomaly_map for p in predictions]),
            pred_score=torch.cat([p.pred_score for p in predictions]),
        )
        return self.score_batch(batch)

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Maps and scores of the validation volumes (anomalib learns thresholds from them)."""
        del args, kwargs  # These variables are not used.
        return self._predict(batch)

    def test_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Maps and scores of the test volumes."""
        del args, kwargs  # These variables are not used.
        return self._predict(batch)

    def predict_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Maps and scores of the volumes to predict."""
        del args, kwargs  # These variables are not used.
        return self._predict(batch)

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No trainer settings are forced (they would override the user's)."""
        return {}

    @property
    def learning_type(self) -> LearningType:
        """Trained on healthy volumes only."""
        return LearningType.ONE_CLASS
