"""What every simpleslicenet model shares on top of :class:`~anomalib.models.components.AnomalibModule`.

* It remembers how its training volumes were prepared (grid, intensity scaling, spacing, contrast)
  and the Dice threshold chosen on the validation split, and stores them in checkpoints and exported
  models, so inference on a new scan repeats exactly the same preprocessing and a file that is not
  one of our models can be recognised and refused.
* Scores stay in the model's own units (no min-max normalisation, no anomalib thresholds): the
  normalisation clamps to [0, 1], which turns the highest and lowest scores into ties that distort
  AUROC/AUPRC, and a threshold learnt on validation maps would not apply to normalised test maps.
* Its visualizer writes NIfTI anomaly maps in the scan's own space (:class:`VolumeMapWriter`).
* OpenVINO export is atomic and tagged with that metadata.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["VolumeModelMixin", "METADATA_KEY", "read_checkpoint_metadata"]

METADATA_KEY = "simpleslicenet"

# Datamodule attributes that define the preprocessing a model was trained with.
_PREPROCESSING_ATTRS = ("target_shape", "intensity", "resample_mm", "contrast", "modality")


def read_checkpoint_metadata(checkpoint: dict) -> dict | None:
    """The simpleslicenet block of a Lightning checkpoint, or ``None`` if it is not one of ours."""
    return checkpoint.get(METADATA_KEY)


class VolumeModelMixin:
    """Mix into an ``AnomalibModule`` subclass (before it in the bases)."""

    volume_preprocessing: dict[str, Any]
    dice_threshold: float | None = None

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__name__.endswith("Mixin"):
            from simpleslicenet.plugin import expose

            expose(cls, "anomalib.models")

    def _ensure_metadata(self) -> dict[str, Any]:
        if not hasattr(self, "volume_preprocessing"):
            self.volume_preprocessing = {}
        return self.volume_preprocessing

    def metadata(self) -> dict[str, Any]:
        """Class path, preprocessing and validation Dice threshold, as stored in checkpoints and exports."""
        cls = type(self)
        return {
            "class_path": f"{cls.__module__}.{cls.__qualname__}",
            "preprocessing": dict(self._ensure_metadata()),
            "dice_threshold": self.dice_threshold,
            "scoring": {
                "volume_score_mode": getattr(self, "volume_score_mode", "max"),
                "topk_fraction": getattr(self, "topk_fraction", 0.001),
            },
        }

    def on_fit_start(self) -> None:
        """Record the datamodule's preprocessing settings."""
        super().on_fit_start()
        datamodule = getattr(self.trainer, "datamodule", None)
        record = self._ensure_metadata()
        for attr in _PREPROCESSING_ATTRS:
            value = getattr(datamodule, attr, None)
            if value is not None:
                record[attr] = list(value) if isinstance(value, tuple) else value

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:  # noqa: D102
        super().on_save_checkpoint(checkpoint)
        checkpoint[METADATA_KEY] = self.metadata()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:  # noqa: D102
        super().on_load_checkpoint(checkpoint)
        block = read_checkpoint_metadata(checkpoint) or {}
        self.volume_preprocessing = dict(block.get("preprocessing", {}))
        self.dice_threshold = block.get("dice_threshold")

    def configure_post_processor(self):  # noqa: ANN201
        """Raw scores out: neither normalisation nor anomalib's F1 thresholds (see the module docstring)."""
        from anomalib.post_processing import PostProcessor

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
        from simpleslicenet.metrics import default_volume_evaluator

        return default_volume_evaluator()

    @classmethod
    def configure_visualizer(cls):  # noqa: ANN206
        """NIfTI map writer instead of anomalib's PIL-based image visualizer."""
        from simpleslicenet.visualization import VolumeMapWriter

        return VolumeMapWriter()

    def export_input_size(self, input_size: tuple[int, int] | None) -> tuple[int, int] | None:
        """Slice size ``(H, W)`` of the export graph: the training grid's, unless given.

        Only the number of slices stays dynamic; a fixed in-plane size keeps every feature map's size
        static in the traced graph (tracing with dynamic H, W specialises the upsampling sizes).
        """
        target = self._ensure_metadata().get("target_shape")
        if input_size is None and target:
            return (int(target[1]), int(target[0]))  # grid is (x, y, z); slices are [H=y, W=x]
        return input_size

    def to_openvino(
        self,
        export_root: Path | str,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        *args,
        **kwargs,
    ) -> Path:
        """anomalib's OpenVINO export, written atomically and tagged with :meth:`metadata`.

        The IR is produced in a temporary folder beside the destination and moved into place only
        when complete, so a failed export never leaves a half-written model where a good one was.
        The graph takes one volume's slice stack ``[D, 3, H, W]`` with a dynamic ``D``.
        """
        import openvino as ov

        input_size = self.export_input_size(input_size)
        final_dir = Path(export_root) / "weights" / "openvino"
        final_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".export-", dir=final_dir.parent))
        try:
            staged_xml = super().to_openvino(staging, model_file_name, input_size, *args, **kwargs)
            ov_model = ov.Core().read_model(staged_xml)
            ov_model.set_rt_info(json.dumps(self.metadata()), [METADATA_KEY])
            tagged = staging / "tagged"
            tagged.mkdir()
            ov.save_model(ov_model, tagged / staged_xml.name, compress_to_fp16=False)
            backup = final_dir.with_name(".openvino-previous")
            shutil.rmtree(backup, ignore_errors=True)
            if final_dir.exists():
                final_dir.rename(backup)
            try:
                tagged.rename(final_dir)
            except BaseException:
                if backup.exists():
                    backup.rename(final_dir)
                raise
            shutil.rmtree(backup, ignore_errors=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return final_dir / staged_xml.name
