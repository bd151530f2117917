"""Volume inference on the CPU: a NIfTI scan in, an anomaly map in the scan's own space out.

The exported graph (or the checkpointed model) sees one volume's slice stack ``[D, 3, H, W]`` in
[0, 1]; everything around it — reading, reorientation, brain mask, intensity scaling, crop/pad, and
putting the map back into the scan's grid — happens here, with the settings recorded at training time.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from simpleslicenet.data.geometry import VolumeGeometry
from simpleslicenet.data.slices import slice_masks, slice_stack
from simpleslicenet.data.volume import VolumePreprocessing, load_volume
from simpleslicenet.deploy.loading import ModelFileError, ModelOutputError, check_model_output, load_checkpoint_model
from simpleslicenet.deploy.openvino import load_openvino
from simpleslicenet.heap import reuse_freed_heap
from simpleslicenet.model_metadata import ModelMetadata
from simpleslicenet.models.scoring import score_volumes

__all__ = ["VolumeInferencer", "VolumePrediction", "ModelFileError", "ModelOutputError"]


@dataclass
class VolumePrediction:
    """Result for one scan.

    Args:
        anomaly_map: Voxel scores in the scan's canonical grid (``x, y, z``); outside the model's box the
            volume's lowest score.
        model_map: Voxel scores in the model grid ``[D, H, W]``.
        slice_scores: Score of each model-grid slice ``[D]``.
        volume_score: Score of the whole volume.
        geometry: Where the model grid sits in the scan.
        brain_mask: Model-grid brain mask ``[D, H, W]``.
        scan_brain_mask: Brain mask in the scan's canonical grid (``False`` outside the model's box).
        model_image: The preprocessed scan on the model grid ``[D, H, W]`` (what the model saw).
    """

    anomaly_map: np.ndarray
    scan_brain_mask: np.ndarray
    model_map: np.ndarray
    slice_scores: np.ndarray
    volume_score: float
    geometry: VolumeGeometry
    brain_mask: np.ndarray
    model_image: np.ndarray | None = None


class VolumeInferencer:
    """Runs an exported OpenVINO model (``.xml``) or a Lightning checkpoint (``.ckpt``) on NIfTI scans.

    Args:
        model_path: ``model.xml`` from ``simpleslicenet export``/``anomalib export``, or a ``.ckpt``.
        device: OpenVINO device (``"CPU"``) or torch device for checkpoints (``"cpu"``, ``"cuda"``).
        precision: ``"f32"`` (default: matches torch to ~1e-6) or ``"bf16"`` (faster on CPUs with
            bf16 support; scores move by about 1e-2). OpenVINO only.
        modality: If given, refuse models trained on another contrast/modality.
        streams: Scans an exported model runs at once, from as many threads, each on its share of the
            cores (``predict`` runs two: more scans a second, each one slower). Checkpoints run one.

    An exported model may run scans from several threads at once (each has its own infer request).
    Model files are loaded without running code from them and their metadata is validated
    (:mod:`simpleslicenet.deploy.loading`); :meth:`run_slices` refuses output that is not one finite map
    per slice (:class:`ModelOutputError`).

    Raises:
        ModelFileError: Missing file, unknown format, a checkpoint that would run code, a model class
            that is not one of the package's, invalid metadata, or a graph that is not an exported
            simpleslicenet model.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        device: str = "CPU",
        precision: str = "f32",
        modality: str | None = None,
        streams: int = 1,
    ) -> None:
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            msg = f"{self.model_path}: model file does not exist"
            raise ModelFileError(msg)
        if isinstance(streams, bool) or not isinstance(streams, int) or streams < 1:
            msg = f"streams must be a whole number of scans >= 1, got {streams!r}"
            raise ValueError(msg)
        if precision not in {"f32", "bf16"}:
            msg = f"precision must be 'f32' or 'bf16', got {precision!r}"
            raise ValueError(msg)
        suffix = self.model_path.suffix.lower()
        self.streams = 1
        if suffix == ".xml":
            self._load_openvino(device, precision, streams)
        elif suffix == ".ckpt":
            self._load_checkpoint(device)
        else:
            msg = f"{self.model_path}: unknown model format {suffix!r}: expected an OpenVINO .xml or a Lightning .ckpt"
            raise ModelFileError(msg)
        # Validated by the loaders: known keys, accepted class, finite numbers, a grid within the voxel limit.
        self.preprocessing = self._metadata.preprocessing or VolumePreprocessing()
        self.scoring = self._metadata.scoring
        self.metadata = self._metadata.to_dict()
        trained_on = self.preprocessing.modality
        if modality is not None and trained_on is not None and modality.lower() != trained_on:
            msg = f"{self.model_path}: model was trained on {trained_on} scans, not {modality}"
            raise ModelFileError(msg)

    # -- loading -------------------------------------------------------------------------------
    def _load_openvino(self, device: str, precision: str, streams: int) -> None:
        loaded = load_openvino(self.model_path, device=device, precision=precision, streams=streams)
        self.streams = streams
        self._metadata: ModelMetadata = loaded.metadata
        self.backend = "openvino"
        self._compiled = loaded.compiled
        self._output_names = loaded.output_names
        self._requests = threading.local()  # an infer request per thread: scans may run side by side

    def _load_checkpoint(self, device: str) -> None:
        self._device = torch.device(device.lower() if device.upper() != "CPU" else "cpu")
        self._model, self._metadata = load_checkpoint_model(self.model_path, device=str(self._device))
        self.backend = "torch"
        if self._device.type == "cpu":
            reuse_freed_heap()  # the eager encoder's activations, scan after scan (simpleslicenet.heap)

    # -- running -------------------------------------------------------------------------------
    def run_slices(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Raw anomaly map ``[D, h, w]`` of a slice stack ``[D, 3, H, W]`` in [0, 1] (see :func:`slice_stack`).

        Raises:
            ModelOutputError: The model gave no finite map per slice.
        """
        images = np.ascontiguousarray(images, dtype=np.float32)
        if self.backend == "openvino":
            request = getattr(self._requests, "request", None)
            if request is None:
                request = self._requests.request = self._compiled.create_infer_request()
            outputs = request.infer({0: images}, share_inputs=True)  # no second copy of the slice stack
            named = {name: outputs[i] for i, name in enumerate(self._output_names)}
            anomaly_map = torch.from_numpy(np.asarray(named["anomaly_map"]))
        else:
            with torch.no_grad():
                anomaly_map = self._model(torch.from_numpy(images).to(self._device)).anomaly_map.float().cpu()
        check_model_output(anomaly_map.numpy(), depth=images.shape[0], source=self.model_path)
        return anomaly_map

    def predict(self, scan_path: str | os.PathLike, brain_mask_path: str | os.PathLike | None = None) -> VolumePrediction:
        """Preprocess a scan exactly as in training, run the model, and map the result back to the scan.

        Args:
            scan_path: The scan (resampled to the training spacing when its voxel size differs).
            brain_mask_path: Its brain mask, used when the model was trained with brain-mask files.
        """
        volume = load_volume(scan_path, self.preprocessing, brain_mask_path=brain_mask_path)
        # The datamodules' slice stack, made without their batch class: deployment never imports anomalib.
        images = slice_stack(volume.image)
        brain_slices = slice_masks(volume.brain_mask)
        scores = score_volumes(self.run_slices(images), brain_slices, scoring=self.scoring)
        amap, brain = scores.anomaly_map.numpy(), brain_slices.numpy()
        return VolumePrediction(
            anomaly_map=volume.geometry.to_scan(amap),
            scan_brain_mask=volume.geometry.to_scan(brain, fill=False),
            model_map=amap,
            slice_scores=scores.slice_scores.numpy(),
            volume_score=float(scores.volume_scores[0]),
            geometry=volume.geometry,
            brain_mask=brain,
            model_image=images[:, 0].numpy(),
        )
