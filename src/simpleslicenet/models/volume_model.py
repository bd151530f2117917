"""What every simpleslicenet model shares on top of :class:`~anomalib.models.components.AnomalibModule`.

* **One scoring step.** A model's own code ends at its raw voxel map; :meth:`VolumeModelMixin.score_batch`
  (:func:`~simpleslicenet.models.scoring.score_volumes`) restricts it to the brain and sets slice and
  volume scores, the same for every model and for the deployed inferencer.
* **It remembers how it was trained.** The datamodule's :class:`~simpleslicenet.data.volume.VolumePreprocessing`
  (grid, spacing, scaling, brain mask, modality), the :class:`~simpleslicenet.models.scoring.VolumeScoring`
  and the Dice threshold chosen on validation go into checkpoints and exported models as they are
  (the metadata block of :mod:`simpleslicenet.model_metadata`), so inference repeats exactly the same
  preprocessing, and a file that is not one of ours is recognised.
* **Raw scores.** No min-max normalisation and no anomalib thresholds: the normalisation clamps to
  [0, 1], which turns the highest and lowest scores into ties that distort AUROC/AUPRC, and a threshold
  learnt on validation maps would not apply to normalised test maps.
* Its visualizer writes NIfTI maps in the scan's own space (:class:`~simpleslicenet.visualization.VolumeMapWriter`),
  and its OpenVINO export is atomic and tagged with the metadata (:mod:`simpleslicenet.models.export`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from anomalib.post_processing import PostProcessor
from torchvision.tv_tensors import Mask

from simpleslicenet.data.batch import VolumeBatch
from simpleslicenet.data.volume import VolumePreprocessing
from simpleslicenet.metrics import default_volume_evaluator
from simpleslicenet.metrics.voxel import DiceThreshold
from simpleslicenet.model_metadata import METADATA_KEY, ModelMetadata, parse_metadata
from simpleslicenet.models.export import export_openvino
from simpleslicenet.models.scoring import VolumeScoring, score_volumes, to_slice_grid
from simpleslicenet.visualization import VolumeMapWriter

__all__ = ["VolumeModelMixin"]

logger = logging.getLogger(__name__)


class VolumeModelMixin:
    """Mix into an ``AnomalibModule`` subclass (before it in the bases)."""

    preprocessing: VolumePreprocessing | None = None
    scoring: VolumeScoring = VolumeScoring()
    dice_threshold: float | None = None

    def metadata_record(self) -> ModelMetadata:
        """Class path, preprocessing, scoring and validation Dice threshold, as stored in checkpoints and exports."""
        cls = type(self)
        return ModelMetadata(
            class_path=f"{cls.__module__}.{cls.__qualname__}",
            preprocessing=self.preprocessing,
            scoring=self.scoring,
            dice_threshold=self.dice_threshold,
        )

    def metadata(self) -> dict[str, Any]:
        """:meth:`metadata_record` in its plain form (the checkpoint's ``METADATA_KEY`` entry)."""
        return self.metadata_record().to_dict()

    def score_batch(self, batch: Any) -> Any:  # noqa: ANN401
        """Brain-restricted map, slice scores (``pred_score``) and ``volume_score`` of every volume in a batch.

        Batches that are not volumes (plain images, 2-D mode) are returned unchanged.
        """
        if not isinstance(batch, VolumeBatch) or batch.anomaly_map is None:
            return batch
        if batch.gt_mask is not None and batch.brain_mask is not None:
            # A resizing pre-processor resized the lesion mask with the slices: back to the slice grid,
            # where the map is scored and written (nearest: exact for integer scale factors).
            batch.gt_mask = Mask(to_slice_grid(batch.gt_mask.float(), batch.brain_mask.shape[-2:], mode="nearest") > 0.5)
        scores = score_volumes(
            batch.anomaly_map,
            batch.brain_mask,
            [rows for _, rows in batch.volumes()],
            self.scoring,
        )
        batch.anomaly_map = scores.anomaly_map
        batch.pred_score = scores.slice_scores
        batch.volume_score = scores.volume_scores
        return batch

    def on_fit_start(self) -> None:
        """Record how the datamodule prepares its volumes."""
        super().on_fit_start()
        preprocessing = getattr(getattr(self.trainer, "datamodule", None), "preprocessing", None)
        if isinstance(preprocessing, VolumePreprocessing):
            self.preprocessing = preprocessing
        every, epochs = self.trainer.check_val_every_n_epoch, self.trainer.max_epochs
        if every and epochs and epochs > 0 and epochs % every:
            logger.warning(
                "validation runs every %d epochs, so not after the last of %d: the Dice threshold kept for "
                "testing and deployment will be the one of epoch %d's model",
                every, epochs, epochs - epochs % every,
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:  # noqa: D102
        super().on_save_checkpoint(checkpoint)
        checkpoint[METADATA_KEY] = self.metadata()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:  # noqa: D102
        super().on_load_checkpoint(checkpoint)
        block = checkpoint.get(METADATA_KEY)
        if block is None:
            return
        stored = parse_metadata(block, "checkpoint")
        self.preprocessing = stored.preprocessing
        self.scoring = stored.scoring
        self.dice_threshold = stored.dice_threshold
        self._restore_validation_threshold()

    def _restore_validation_threshold(self) -> None:
        """Give the evaluator the stored threshold, so testing a reloaded model needs no validation pass."""
        if self.dice_threshold is None:
            return
        for metric in getattr(getattr(self, "evaluator", None), "val_metrics", []):
            holder = getattr(metric, "threshold", None)
            if isinstance(holder, DiceThreshold):
                holder.value = self.dice_threshold

    def configure_post_processor(self):  # noqa: ANN201
        """Raw scores out: neither normalisation nor anomalib's F1 thresholds (see the module docstring)."""
        return PostProcessor(enable_normalization=False, enable_thresholding=False)

    def on_validation_epoch_end(self) -> None:
        """Keep the validation Dice threshold (logged by the evaluator just before) for deployment."""
        super().on_validation_epoch_end()
        threshold = self.trainer.callback_metrics.get("voxel_diceThreshold")
        if threshold is not None and torch.isfinite(threshold):
            self.dice_threshold = float(threshold)

    @staticmethod
    def configure_evaluator():  # noqa: ANN205
        """Volumetric test metrics: brain-masked voxel AUROC/AUPRC, Dice at the validation threshold,
        max Dice, slice and volume AUROC/AUPRC (see :mod:`simpleslicenet.metrics`)."""
        return default_volume_evaluator()

    @classmethod
    def configure_visualizer(cls):  # noqa: ANN206
        """NIfTI map writer instead of anomalib's PIL-based image visualizer."""
        return VolumeMapWriter()

    def to_openvino(
        self,
        export_root: Path | str,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        *args,
        **kwargs,
    ) -> Path:
        """anomalib's OpenVINO export, atomic and tagged (see :func:`simpleslicenet.models.export.export_openvino`)."""

        def anomalib_export(staging: Path, size: tuple[int, int] | None) -> Path:
            return super(VolumeModelMixin, self).to_openvino(staging, model_file_name, size, *args, **kwargs)

        return export_openvino(self.metadata_record(), export_root, anomalib_export, input_size)
