"""Writes each test/predict volume's anomaly map as NIfTI in the scan's own space, plus a PNG preview.

anomalib's ``ImageVisualizer`` re-opens ``image_path`` with PIL, which fails on NIfTI scans. Every
simpleslicenet model uses :class:`VolumeMapWriter` in its place. It writes the same files as
``simpleslicenet predict``, through the same writer (:mod:`simpleslicenet.scan_outputs`): per volume
``<scan name>_anomaly_map.nii.gz`` (overlay it on the scan in ITK-SNAP or FSLeyes), once a validation
threshold exists ``<scan name>_anomaly_mask.nii.gz`` (voxels at or above it), and
``<scan name>_preview.png`` of the slices that matter: the map inside the brain with a colour bar, the
region above the validation threshold and the true lesion outline.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from anomalib.visualization import Visualizer

from simpleslicenet.data.scans import nifti_stem
from simpleslicenet.scan_outputs import ScanOutputs, one_write_in_flight, output_paths, threshold_mask, write_scan_outputs

__all__ = ["VolumeMapWriter"]


class VolumeMapWriter(Visualizer):
    """Lightning callback writing one NIfTI anomaly map (a mask and a PNG preview) per test/predict volume.

    Args:
        output_dir: Folder for the outputs; default ``<trainer.default_root_dir>/anomaly_maps`` of the
            trainer that runs the test or prediction (so each run writes into its own folder).
        previews: Also write a PNG preview per volume.
    """

    def __init__(self, output_dir: str | Path | None = None, previews: bool = True) -> None:
        super().__init__()
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.previews = previews
        self._sources: dict[tuple[Path, str], str] = {}  # (folder, file stem) -> scan it was written for
        # During a test or predict epoch a volume's files are written on a thread while the next volume
        # runs; the epoch ends when the last is written.
        self._writes: AbstractContextManager | None = None
        self._submit: Any = None

    def write(self, batch: Any, folder: str | Path | None = None, threshold: float | None = None) -> list[Path]:  # noqa: ANN401
        """Write the maps of every volume in a predicted :class:`VolumeBatch`; returns the NIfTI paths.

        Args:
            batch: The predicted batch.
            folder: Where to write; default ``output_dir``.
            threshold: Score from which voxels are flagged (mask file and the preview's outline), e.g. the
                validation threshold; ``None``: no mask.
        """
        folder = Path(folder) if folder is not None else self.output_dir
        if folder is None:
            msg = "VolumeMapWriter.write needs a folder: pass one or set output_dir"
            raise ValueError(msg)
        written = []
        if batch.anomaly_map is None or getattr(batch, "geometry", None) is None:
            return written
        for _volume, rows in batch.volumes():
            geometry = batch.geometry[rows.start]
            if geometry is None:
                continue
            # Copies: the files may be written after the batch's tensors have moved on.
            amap = batch.anomaly_map[rows].detach().float().cpu().numpy().copy()
            source = geometry.path or batch.image_path[rows.start]
            stem = nifti_stem(source) or Path(source).stem
            if self._sources.setdefault((folder, stem), source) != source:
                # Two scans of one name (e.g. healthy/001 and lesion/001): keep both maps.
                stem = f"{Path(source).parent.name}_{stem}"
            part = batch.rows(rows)
            brain = part.brain_mask.cpu().numpy().astype(bool) if part.brain_mask is not None else None
            flagged = threshold is not None and np.isfinite(threshold)
            outputs = ScanOutputs(
                name=stem,
                geometry=geometry,
                model_map=amap,
                mask=threshold_mask(amap, threshold, brain) if flagged else None,
                image=part.image[:, 0].detach().float().cpu().numpy().copy() if self.previews else None,
                brain=brain,
                lesion=part.gt_mask.cpu().numpy().astype(bool) if part.gt_mask is not None else None,
            )
            if self._submit is None:
                written.append(write_scan_outputs(outputs, folder, preview=self.previews, overwrite=True)["map"])
            else:
                self._submit(write_scan_outputs, outputs, folder, self.previews, True)
                written.append(output_paths(folder, outputs, self.previews)["map"])
        return written

    def _start_writing(self) -> None:
        self._finish_writing()
        self._writes = one_write_in_flight()
        self._submit = self._writes.__enter__()

    def _finish_writing(self, error: BaseException | None = None) -> None:
        """Wait for the last write (a failed write raises here), or cancel it after ``error``."""
        writes, self._writes, self._submit = self._writes, None, None
        if writes is not None:
            writes.__exit__(type(error) if error else None, error, error.__traceback__ if error else None)

    def _on_batch_end(self, trainer: Any, outputs: Any) -> None:  # noqa: ANN401
        folder = self.output_dir or Path(trainer.default_root_dir) / "anomaly_maps"
        folder.mkdir(parents=True, exist_ok=True)
        threshold = getattr(trainer.lightning_module, "dice_threshold", None)
        with torch.no_grad():
            self.write(outputs, folder, threshold=threshold)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001, D102
        del pl_module, batch, batch_idx, dataloader_idx
        self._on_batch_end(trainer, outputs)

    def on_test_epoch_start(self, trainer, pl_module) -> None:  # noqa: ANN001, D102
        del trainer, pl_module
        self._start_writing()

    def on_test_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001, D102
        del trainer, pl_module
        self._finish_writing()

    on_predict_epoch_start = on_test_epoch_start
    on_predict_epoch_end = on_test_epoch_end

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:  # noqa: ANN001, D102
        del trainer, pl_module
        self._finish_writing(exception)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001, D102
        del pl_module, batch, batch_idx, dataloader_idx
        self._on_batch_end(trainer, outputs)
