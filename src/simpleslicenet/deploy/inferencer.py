"""Volume inference on the CPU: a NIfTI scan in, an anomaly map in the scan's own space out.

The exported graph (or the checkpointed model) sees one volume's slice stack ``[D, 3, H, W]`` in
[0, 1]; everything around it — reading, reorientation, brain mask, intensity scaling, crop/pad, and
putting the map back into the scan's grid — happens here, with the settings recorded at training time.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812

from simpleslicenet.data.dataset import volume_to_batch
from simpleslicenet.data.volume import VolumeGeometry, from_slices, load_volume, uncrop
from simpleslicenet.models.volume_model import METADATA_KEY
from simpleslicenet.models.volume_ops import restrict_to_brain, volume_score

__all__ = ["VolumeInferencer", "VolumePrediction", "ModelFileError"]


class ModelFileError(ValueError):
    """A model file that cannot be used for volume inference (message names the file)."""


@dataclass
class VolumePrediction:
    """Result for one scan.

    Args:
        anomaly_map: Voxel scores in the scan's canonical grid (``x, y, z``), 0 outside the model's box.
        model_map: Voxel scores in the model grid ``[D, H, W]``.
        slice_scores: Score of each model-grid slice ``[D]``.
        volume_score: Score of the whole volume.
        geometry: Where the model grid sits in the scan.
        brain_mask: Model-grid brain mask ``[D, H, W]``.
        scan_brain_mask: Brain mask in the scan's canonical grid (``False`` outside the model's box).
    """

    anomaly_map: np.ndarray
    scan_brain_mask: np.ndarray
    model_map: np.ndarray
    slice_scores: np.ndarray
    volume_score: float
    geometry: VolumeGeometry
    brain_mask: np.ndarray


class VolumeInferencer:
    """Runs an exported OpenVINO model (``.xml``) or a Lightning checkpoint (``.ckpt``) on NIfTI scans.

    Args:
        model_path: ``model.xml`` from ``simpleslicenet export``/``anomalib export``, or a ``.ckpt``.
        device: OpenVINO device (``"CPU"``) or torch device for checkpoints (``"cpu"``, ``"cuda"``).
        precision: ``"f32"`` (default: matches torch to ~1e-6) or ``"bf16"`` (faster on CPUs with
            bf16 support; scores move by about 1e-2). OpenVINO only.
        modality: If given, refuse models trained on another contrast/modality.

    Raises:
        ModelFileError: Missing file, unknown format, or a model that is not an exported simpleslicenet model.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        device: str = "CPU",
        precision: str = "f32",
        modality: str | None = None,
    ) -> None:
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            msg = f"{self.model_path}: model file does not exist"
            raise ModelFileError(msg)
        if precision not in {"f32", "bf16"}:
            msg = f"precision must be 'f32' or 'bf16', got {precision!r}"
            raise ValueError(msg)
        suffix = self.model_path.suffix.lower()
        if suffix == ".xml":
            self._load_openvino(device, precision)
        elif suffix == ".ckpt":
            self._load_checkpoint(device)
        else:
            msg = f"{self.model_path}: unknown model format {suffix!r}: expected an OpenVINO .xml or a Lightning .ckpt"
            raise ModelFileError(msg)
        self.preprocessing = dict(self.metadata.get("preprocessing", {}))
        trained_on = self.preprocessing.get("contrast") or self.preprocessing.get("modality")
        if modality is not None and trained_on is not None and modality.lower() != str(trained_on).lower():
            msg = f"{self.model_path}: model was trained on {trained_on} scans, not {modality}"
            raise ModelFileError(msg)

    # -- loading -------------------------------------------------------------------------------
    def _load_openvino(self, device: str, precision: str) -> None:
        import openvino as ov

        core = ov.Core()
        try:
            model = core.read_model(self.model_path)
        except RuntimeError as error:
            msg = f"{self.model_path}: not a readable OpenVINO model ({error})"
            raise ModelFileError(msg) from error
        if not model.has_rt_info([METADATA_KEY]):
            msg = (
                f"{self.model_path}: not an exported simpleslicenet model (no '{METADATA_KEY}' metadata); "
                "export it with `simpleslicenet export` or `anomalib export` from a simpleslicenet checkpoint"
            )
            raise ModelFileError(msg)
        self.metadata = json.loads(model.get_rt_info([METADATA_KEY]).astype(str))
        self.backend = "openvino"
        config = {"INFERENCE_PRECISION_HINT": precision}
        self._compiled = core.compile_model(model, device.upper(), config)
        self._output_names = [output.get_any_name() for output in self._compiled.outputs]

    def _load_checkpoint(self, device: str) -> None:
        import importlib

        try:
            checkpoint = torch.load(self.model_path, map_location="cpu", weights_only=False)
        except Exception as error:  # noqa: BLE001 - torch raises many types for foreign files
            msg = f"{self.model_path}: not a readable checkpoint ({type(error).__name__}: {error})"
            raise ModelFileError(msg) from error
        block = checkpoint.get(METADATA_KEY) if isinstance(checkpoint, dict) else None
        if block is None:
            msg = f"{self.model_path}: not a simpleslicenet checkpoint (no '{METADATA_KEY}' entry)"
            raise ModelFileError(msg)
        module_name, class_name = block["class_path"].rsplit(".", 1)
        cls = getattr(importlib.import_module(module_name), class_name)
        self.metadata = block
        self.backend = "torch"
        self._device = torch.device(device.lower() if device.upper() != "CPU" else "cpu")
        self._model = cls.load_from_checkpoint(self.model_path, map_location=self._device, weights_only=False)
        self._model.eval()

    # -- running -------------------------------------------------------------------------------
    def run_slices(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Anomaly map ``[D, H, W]`` and slice scores ``[D]`` for a slice stack ``[D, 3, H, W]`` in [0, 1]."""
        images = np.ascontiguousarray(images, dtype=np.float32)
        if self.backend == "openvino":
            outputs = self._compiled(images)
            named = {name: outputs[i] for i, name in enumerate(self._output_names)}
            amap, scores = torch.from_numpy(np.asarray(named["anomaly_map"])), np.asarray(named["pred_score"])
        else:
            with torch.no_grad():
                result = self._model(torch.from_numpy(images).to(self._device))
            amap, scores = result.anomaly_map.float().cpu(), result.pred_score.float().cpu().numpy()
        amap = amap.reshape(images.shape[0], *amap.shape[-2:])
        if tuple(amap.shape[-2:]) != tuple(images.shape[2:]):
            # Models that resize slices internally return maps at their own size: back to the slice grid.
            amap = F.interpolate(amap[:, None], size=images.shape[2:], mode="bilinear", align_corners=False)[:, 0]
        return amap.numpy(), scores.reshape(-1)

    def predict(self, scan_path: str | os.PathLike, brain_mask_path: str | os.PathLike | None = None) -> VolumePrediction:
        """Preprocess a scan exactly as in training, run the model, and map the result back to the scan."""
        prep = self.preprocessing
        volume = load_volume(
            scan_path,
            target_shape=tuple(prep["target_shape"]) if prep.get("target_shape") else None,
            brain_mask_path=brain_mask_path,
            intensity=prep.get("intensity", "percentile"),
            resample_mm=prep.get("resample_mm"),
        )
        batch = volume_to_batch(volume.image, brain_mask=volume.brain_mask, geometry=volume.geometry)
        raw_map, _ = self.run_slices(batch.image.numpy())
        # As in training and testing: scores come from brain voxels only.
        restricted, slice_scores = restrict_to_brain(torch.from_numpy(raw_map), batch.brain_mask)
        scoring = self.metadata.get("scoring", {})
        score = float(
            volume_score(
                restricted,
                batch.brain_mask,
                mode=scoring.get("volume_score_mode", "max"),
                topk_fraction=scoring.get("topk_fraction", 0.001),
            )
        )
        amap, slice_scores, brain = restricted.numpy(), slice_scores.numpy(), batch.brain_mask.numpy()
        # Outside the model's box the scan gets the volume's lowest score, never a value that could
        # exceed real scores (log-likelihood scores are negative).
        full = uncrop(from_slices(amap), volume.geometry, fill=float(amap.min()))
        return VolumePrediction(
            anomaly_map=full,
            scan_brain_mask=uncrop(from_slices(brain), volume.geometry, fill=False),
            model_map=amap,
            slice_scores=slice_scores,
            volume_score=score,
            geometry=volume.geometry,
            brain_mask=brain,
        )
